"""Deployment set-up without a running federation: certificates, site keys, site config, start-up checks."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from medfed.cli import app
from medfed.contracts import NodeConfig, SitePolicy
from medfed.deploy.pki import (KeyFileError, certificate_names, create_ca, create_site_key, load_certificate,
                               public_key_fingerprint, write_private)
from medfed.deploy.coordinator import ServerDir, register_site
from medfed.deploy.hospital import check_site_data, rotate_site_key
from medfed.deploy.sitecfg import read_site_config
from medfed.errors import ConfigError, DatasetError


def mode(path):
    return path.stat().st_mode & 0o777


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A real TLS handshake over a local socket pair; raises ``ssl.SSLError`` when the client refuses."""
    left, right = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(right, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=hostname) as c:
            c.sendall(b"x")
    finally:
        thread.join(10)


def test_server_init_makes_a_ca_and_a_server_certificate_tls_clients_accept(tmp_path):
    out = CliRunner().invoke(app, ["server", "init", "--dir", str(tmp_path / "srv"), "--name", "coord.example.org",
                                   "--name", "10.1.2.3", "--port", "19092"])
    assert out.exit_code == 0, out.output
    sd = ServerDir(tmp_path / "srv")
    assert mode(sd.ca.key) == 0o600 and mode(sd.server_key) == 0o600
    assert certificate_names(sd.server_cert) == ["coord.example.org", "localhost", "10.1.2.3", "127.0.0.1"]
    load_certificate(sd.server_cert).verify_directly_issued_by(load_certificate(sd.ca.cert))
    connection = (sd.root / "flwr-home" / "config.toml").read_text()
    assert 'address = "127.0.0.1:19092"' in connection and str(sd.ca.cert) in connection

    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(sd.server_cert, sd.server_key)
    handshake(server, ssl.create_default_context(cafile=str(sd.ca.cert)), "coord.example.org")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|doesn't match"):
        handshake(server, ssl.create_default_context(cafile=str(sd.ca.cert)), "other.example.org")
    stranger = create_ca(tmp_path / "stranger")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(server, ssl.create_default_context(cafile=str(stranger.cert)), "coord.example.org")

    again = CliRunner().invoke(app, ["server", "init", "--dir", str(sd.root), "--name", "coord.example.org"])
    assert isinstance(again.exception, ConfigError) and "--renew-cert" in str(again.exception)
    old_ca = sd.ca.cert.read_bytes()
    renewed = CliRunner().invoke(app, ["server", "init", "--dir", str(sd.root), "--name", "new.example.org",
                                       "--renew-cert"])
    assert renewed.exit_code == 0, renewed.output
    assert sd.ca.cert.read_bytes() == old_ca and "new.example.org" in certificate_names(sd.server_cert)


def test_site_key_is_what_flower_reads_and_its_fingerprint_matches_ssh_keygen(tmp_path):
    pair = create_site_key(tmp_path / "site" / "site-key", comment="hospital-a")
    assert mode(pair.private) == 0o600 and mode(pair.private.parent) == 0o700
    assert load_ssh_private_key(pair.private.read_bytes(), None).curve.name == "secp384r1"  # as flower-supernode
    assert try_load_public_key(pair.public)  # Flower's own check in `flwr supernode register`
    fingerprint = public_key_fingerprint(pair.public)
    if shutil.which("ssh-keygen"):
        listed = subprocess.run(["ssh-keygen", "-lf", str(pair.public)], capture_output=True, text=True, check=True)
        assert listed.stdout.split()[1] == fingerprint
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_site_key(pair.private, comment="again")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_private(pair.private, b"x")
    ed25519 = tmp_path / "ed25519.pub"
    ed25519.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x\n")
    with pytest.raises(KeyFileError, match="NIST curve"):
        public_key_fingerprint(ed25519)


def init_site(tmp_path, data, fmt="npz", **extra):
    ca = tmp_path / "ca" / "ca.crt"
    if not ca.exists():
        create_ca(ca.parent)
    args = ["site", "init", "--dir", str(tmp_path / "site"), "--name", "hospital-a", "--superlink",
            "coord.example.org:9092", "--ca-cert", str(ca), "--data", str(data), "--format", fmt,
            "--cap-epsilon", "10"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return CliRunner().invoke(app, args)


def test_site_init_writes_a_private_site_folder_and_its_node_config(tmp_path, breastmnist):
    out = init_site(tmp_path, breastmnist, delta=1e-6, runtime_port=9095, share_evaluation=True)
    assert out.exit_code == 0, out.output
    site = tmp_path / "site"
    cfg = read_site_config(site)
    assert mode(site) == 0o700 and mode(cfg.private_key) == 0o600 and mode(cfg.state_dir) == 0o700
    assert cfg.ca_cert == site / "ca.crt" and cfg.runtime_port == 9095
    node = NodeConfig.from_flower(cfg.node_config())  # what the site's ClientApp will read
    assert (node.data_path, node.data_format, node.site_name, node.state_dir, node.cap_epsilon) == (
        str(breastmnist), "npz", "hospital-a", str(site / "state"), 10.0)
    # the policy: delta as given, strict defaults, share-evaluation as asked, the dataset size counted at init
    assert node.policy == SitePolicy(delta=1e-6, share_evaluation=True, dataset_size=546)
    assert public_key_fingerprint(site / "site-key.pub") in out.output
    assert "medfed server register-site hospital-a.pub --name hospital-a --fingerprint SHA256:" in out.output
    again = init_site(tmp_path, breastmnist)
    assert isinstance(again.exception, ConfigError) and "exists" in str(again.exception)

    exported = CliRunner().invoke(app, ["site", "register", "--dir", str(site), "--out", str(tmp_path)])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "hospital-a.pub").read_bytes() == (site / "site-key.pub").read_bytes()

    old_fp = public_key_fingerprint(site / "site-key.pub")
    rotated = CliRunner().invoke(app, ["site", "rotate-key", "--dir", str(site)])
    assert rotated.exit_code == 0, rotated.output
    assert public_key_fingerprint(site / "site-key.pub.old") == old_fp != public_key_fingerprint(site / "site-key.pub")
    assert mode(site / "site-key") == 0o600
    with pytest.raises(ConfigError, match="previous rotation"):
        rotate_site_key(cfg)


def test_site_config_errors_name_the_file_and_key(tmp_path, breastmnist):
    assert init_site(tmp_path, breastmnist).exit_code == 0
    path = tmp_path / "site" / "site.toml"
    text = path.read_text()
    for bad, key in [(text.replace("cap-epsilon = 10.0", "cap-epsilon = -1.0"), "privacy.cap-epsilon"),
                     (text.replace('superlink = "coord.example.org:9092"', 'superlink = "coord"'), "superlink"),
                     (text.replace('format = "npz"', 'format = "jpeg2000"'), "data.format"),
                     ("colour = 1\n" + text, "colour"),
                     (text.replace('name = "hospital-a"\n', ""), "name")]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=f"{path}.*'{key}'"):
            read_site_config(path.parent)


def test_site_start_refuses_a_data_folder_that_does_not_load(tmp_path):
    empty = tmp_path / "images"
    empty.mkdir()
    assert init_site(tmp_path, empty, fmt="folder").exit_code == 0
    result = CliRunner().invoke(app, ["site", "start", "--dir", str(tmp_path / "site")])
    assert isinstance(result.exception, DatasetError)
    assert f"data.path {empty} (format folder) does not load" in str(result.exception)
    assert not (tmp_path / "site" / "logs").exists()  # no SuperNode was started
    (empty / "scan.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="scan.png"):
        check_site_data(read_site_config(tmp_path / "site"))


def test_site_start_refuses_a_private_key_others_can_read(tmp_path, breastmnist):
    assert init_site(tmp_path, breastmnist).exit_code == 0
    (tmp_path / "site" / "site-key").chmod(0o644)
    result = CliRunner().invoke(app, ["site", "start", "--dir", str(tmp_path / "site")])
    assert isinstance(result.exception, KeyFileError) and "chmod 600" in str(result.exception)


def test_register_refuses_a_key_whose_fingerprint_the_site_did_not_give(tmp_path):
    CliRunner().invoke(app, ["server", "init", "--dir", str(tmp_path / "srv")])
    pair = create_site_key(tmp_path / "k", comment="x")
    with pytest.raises(ConfigError, match="does not match"):
        register_site(ServerDir(tmp_path / "srv"), pair.public, "hospital-a", fingerprint="SHA256:abc")


def test_site_and_server_folders_hold_only_private_files(tmp_path, breastmnist):
    """Keys, ledgers, configs and registries are 0600 in 0700 folders; only certificates and public keys are
    readable by others."""
    from medfed.deploy.coordinator import SiteRecord, write_registry
    from medfed.privacy.anchors import AnchorStore, LedgerHead
    from medfed.privacy.ledger import KEY_FILE, site_ledger

    assert init_site(tmp_path, breastmnist).exit_code == 0
    site = tmp_path / "site"
    cfg = read_site_config(site)
    ledger = site_ledger(cfg.state_dir)
    entry = ledger.append("approval", {"action": "test", "granted": True, "by": "x"})
    assert (cfg.state_dir / KEY_FILE).resolve() == cfg.private_key  # the site's key signs its ledger
    server = tmp_path / "srv"
    assert CliRunner().invoke(app, ["server", "init", "--dir", str(server)]).exit_code == 0
    sd = ServerDir(server)
    write_registry(sd, [SiteRecord("hospital-a", 1, "SHA256:x", "ecdsa-sha2-nistp384 AAAA", "2026-01-01T00:00:00Z")])
    AnchorStore(sd.anchors).update("hospital-a", LedgerHead(1, entry.hash))
    assert sd.anchors.parent == sd.registry.parent
    public = (".crt", ".pub")
    for root in (site, server):
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                continue
            if path.is_dir():
                assert mode(path) == 0o700, path
            elif path.suffix not in public:
                assert mode(path) == 0o600, path
    for path in (ledger.path, ledger.path.with_name(ledger.path.name + ".lock"), sd.registry, sd.anchors,
                 sd.ca.key, sd.server_key, cfg.private_key):
        assert path.exists() and mode(path) == 0o600, path
