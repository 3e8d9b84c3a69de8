"""A hospital site's side of a deployment: its folder, key pair, registration request and SuperNode.

A site folder holds ``site.toml`` (:mod:`medfed.deploy.sitecfg`), the coordinator's ``ca.crt``, the site's key
pair ``site-key`` (0600) / ``site-key.pub``, the privacy state folder (``state/``, 0700, unless configured
elsewhere; its ``ledger-key`` is a link to ``site-key``, the key that signs the privacy ledger), the SuperNode's
logs (``logs/``) and Flower's working folder (``flwr-home/``). The folder is 0700 and every file medfed or Flower
writes in it is 0600 (certificates and ``*.pub`` excepted).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from medfed import __version__
from medfed.config import DataConfig
from medfed.deploy.app_guard import CLIENTAPP_LOG, SECRET_FILE, start_task_server, write_superexec_secret
from medfed.deploy.foreground import NOT_ACTIVATED, ServiceExited, explain_supernode_exit, log_size, serve
from medfed.deploy.pki import (SiteKeyPair, check_private_mode, create_site_key, key_fingerprint, load_certificate,
                               load_site_public_key, make_private_dir, openssh_public, private_files,
                               public_key_fingerprint)
from medfed.contracts import SitePolicy
from medfed.deploy.sitecfg import SITE_FILE, SiteConfig, site_config_path, write_site_config
from medfed.errors import ConfigError, DatasetError, MedfedError
from medfed.launch.deployment import start_supernode
from medfed.launch.processes import ProcessSession
from medfed.privacy.ledger import link_site_key, site_ledger

KEY_FILE = "site-key"
SUPERNODE = "supernode"
PROBE_IMAGE_SIZE = 32
"""Side the start-up data check resizes to, so folders of mixed image sizes load (the run sets the real size)."""


@dataclass(frozen=True)
class RegistrationRequest:
    """What a site sends the coordinator: its public key (not secret) and the fingerprint to confirm by phone."""

    name: str
    public_key: Path
    public_key_text: str
    fingerprint: str

    def coordinator_command(self) -> str:
        return (f"medfed server register-site {self.name}.pub --name {self.name} "
                f"--fingerprint {self.fingerprint}")


@dataclass(frozen=True)
class DataCheck:
    """Outcome of the start-up data check: how many images, and their shape at the probe size."""

    images: int
    shape: tuple[int, int, int]


@private_files
def init_site(folder: Path, *, name: str, superlink: str, ca_cert: Path, data_path: Path, data_format: str,
              cap_epsilon: float, policy: SitePolicy | None = None, state_dir: Path | None = None,
              runtime_port: int = 9094) -> SiteConfig:
    """Create a site folder: a copy of the coordinator's CA certificate, a new key pair, ``site.toml`` (with the
    site's policy: strict defaults, delta 1e-5, and its dataset size counted from ``data_path`` unless given)
    and the state folder. Refuses to touch a folder that already holds a site configuration."""
    folder = Path(folder).expanduser().resolve()
    if (folder / SITE_FILE).exists():
        raise ConfigError(f"{folder / SITE_FILE}: exists; edit it, or use `medfed site rotate-key` for a new key")
    load_certificate(ca_cert)
    make_private_dir(folder)
    cfg = SiteConfig(name=name, superlink=superlink, ca_cert=folder / "ca.crt", private_key=folder / KEY_FILE,
                     data_path=Path(data_path).expanduser().resolve(), data_format=data_format,
                     state_dir=Path(state_dir).expanduser().resolve() if state_dir else folder / "state",
                     cap_epsilon=cap_epsilon, policy=policy or SitePolicy(delta=1e-5), runtime_port=runtime_port)
    if cfg.policy.dataset_size == 0:  # declare what the folder holds now; the hospital reviews it in site.toml
        try:
            cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy,
                                                                      dataset_size=check_site_data(cfg).images))
        except DatasetError:
            pass  # no usable data yet: `medfed site start` asks for the declared size once there is
    write_site_config(cfg, folder / SITE_FILE)  # validates before any key is made
    if Path(ca_cert).resolve() != cfg.ca_cert:
        shutil.copyfile(ca_cert, cfg.ca_cert)
    create_site_key(cfg.private_key, comment=name)
    make_private_dir(cfg.state_dir)
    link_site_key(cfg.state_dir, cfg.private_key)
    return cfg


def public_key_path(cfg: SiteConfig) -> Path:
    return cfg.private_key.with_name(cfg.private_key.name + ".pub")


def registration_request(cfg: SiteConfig) -> RegistrationRequest:
    pub = public_key_path(cfg)
    load_site_public_key(pub)
    return RegistrationRequest(name=cfg.name, public_key=pub, public_key_text=pub.read_text().strip(),
                               fingerprint=public_key_fingerprint(pub))


@private_files
def rotate_site_key(cfg: SiteConfig) -> tuple[SiteKeyPair, SiteKeyPair]:
    """Keep the current key pair as ``*.old`` and make a new one; returns ``(old, new)``. The old key works
    until the coordinator revokes it (``medfed server register-site NEW.pub --name NAME --replace``).

    The site's privacy ledger (which the site key signs) gets a ``key-rotation`` entry, signed by the old key,
    naming the new public key: the chain stays verifiable, later entries are signed by the new key, and the
    coordinator's anchor of the ledger carries over (the ledger only grows).

    Raises:
        ConfigError: a previous rotation is not finished.
        LedgerTamperedError: the ledger does not verify with the current key (nothing is changed).
    """
    old = SiteKeyPair(private=cfg.private_key.with_name(cfg.private_key.name + ".old"),
                      public=cfg.private_key.with_name(cfg.private_key.name + ".pub.old"))
    if old.private.exists():
        raise ConfigError(f"{old.private}: a previous rotation is not finished; delete it once the coordinator "
                          "has revoked the old key")
    make_private_dir(cfg.state_dir)
    link_site_key(cfg.state_dir, cfg.private_key)
    staged = create_site_key(cfg.private_key.with_name(cfg.private_key.name + ".new"), comment=cfg.name,
                             overwrite=True)
    try:
        with site_ledger(cfg.state_dir).transaction() as tx:
            new_signer = openssh_public(load_site_public_key(staged.public))
            tx.add("key-rotation", {"site": cfg.name, "new_signer": new_signer,
                                    "new_fingerprint": key_fingerprint(new_signer),
                                    "old_fingerprint": public_key_fingerprint(public_key_path(cfg))})
            cfg.private_key.rename(old.private)
            public_key_path(cfg).rename(old.public)
            staged.private.rename(cfg.private_key)
            staged.public.rename(public_key_path(cfg))
    finally:
        staged.private.unlink(missing_ok=True)
        staged.public.unlink(missing_ok=True)
    return old, SiteKeyPair(private=cfg.private_key, public=public_key_path(cfg))


def check_site_files(cfg: SiteConfig) -> None:
    """The CA certificate loads, the private key exists and only its owner can read it, the state folder exists
    (created 0700 when missing)."""
    load_certificate(cfg.ca_cert)
    check_private_mode(cfg.private_key)
    try:
        make_private_dir(cfg.state_dir)
    except OSError as err:
        raise ConfigError(f"privacy.state-dir {cfg.state_dir}: cannot be created ({err.strerror})") from None
    link_site_key(cfg.state_dir, cfg.private_key)


def check_site_data(cfg: SiteConfig) -> DataCheck:
    """Load the site's data as a run would (at the probe size); raises :class:`DatasetError` naming the site
    folder when it does not load, so a SuperNode never starts on data that would fail every round."""
    from medfed.datasets import load_dataset

    data_cfg = dataclasses.replace(DataConfig(), dataset=cfg.data_format, path=str(cfg.data_path),
                                   image_size=PROBE_IMAGE_SIZE)
    try:
        data = load_dataset(data_cfg)
    except MedfedError as err:
        raise DatasetError(f"site {cfg.name}: data.path {cfg.data_path} (format {cfg.data_format}) does not load: "
                           f"{err}") from None
    if len(data) == 0:
        raise DatasetError(f"site {cfg.name}: data.path {cfg.data_path} holds no images")
    return DataCheck(images=len(data), shape=data.image_shape)


def site_session(folder: Path) -> ProcessSession:
    """The site's process session: Flower's working folder and the SuperNode's log inside the site folder."""
    folder = site_config_path(folder).resolve().parent
    return ProcessSession(flwr_home=folder / "flwr-home", log_dir=folder / "logs")


def start_site(session: ProcessSession, cfg: SiteConfig, *, name: str = SUPERNODE,
               max_wait_time: float | None = None, executor_secret: Path | None = None) -> subprocess.Popen:
    """Start the site's SuperNode: TLS against ``ca_cert``, authenticated with its key, ``--node-config`` from
    the site config, and (with ``executor_secret``) process isolation, so that only medfed's executor
    (:mod:`medfed.deploy.app_guard`) runs its tasks. Returns at once; the SuperNode connects out and keeps
    reconnecting (or gives up after ``max_wait_time`` seconds without a connection)."""
    check_site_files(cfg)
    return start_supernode(session, cfg.superlink, cfg.runtime_port, cfg.node_config(), ca_cert=cfg.ca_cert,
                           auth_key=cfg.private_key, name=name, max_wait_time=max_wait_time,
                           executor_secret=executor_secret)


ACTIVATION_RETRIES = 2
ACTIVATION_WAIT_S = 35.0
"""A SuperNode that stopped uncleanly (killed, power loss) stays online at the SuperLink for two heartbeat
intervals (2 x 30 s) and its key cannot be activated again until then."""


@private_files
def run_site(session: ProcessSession, cfg: SiteConfig, console: Console, *, retries: int = ACTIVATION_RETRIES,
             wait_s: float = ACTIVATION_WAIT_S, approvals: Path | None = None) -> None:
    """Run the site's SuperNode in the foreground until Ctrl-C/SIGTERM. A refused activation is retried
    ``retries`` times, ``wait_s`` apart, since it also happens right after an unclean stop.

    The SuperNode runs in process isolation with a fresh 0600 secret (``<flwr-home>/superexec-secret``), and this
    process executes its tasks (:mod:`medfed.deploy.app_guard`): the installed medfed ClientApp for medfed's own
    app bundle or one listed in ``approvals`` (``approved-apps.toml``), a refusal for any other bundle.

    Raises:
        ServiceExited: the SuperNode stopped on its own (refused key, TLS failure, revoked), with the reason.
    """
    secret = write_superexec_secret(session.flwr_home / SECRET_FILE)
    for attempt in range(retries + 1):
        offset = log_size(session, SUPERNODE)
        proc = start_site(session, cfg, executor_secret=secret)
        guard, stop = start_task_server(session, f"127.0.0.1:{cfg.runtime_port}", secret, cfg.name, approvals)
        console.print(f"site '{cfg.name}' connecting out to {cfg.superlink} (TLS, key {cfg.private_key.name}); "
                      f"only medfed {__version__}'s own ClientApp runs here (app bundles checked; log "
                      f"{session.log_path(CLIENTAPP_LOG)})", highlight=False)
        try:
            serve(session, SUPERNODE, proc, log_offset=offset, explain=explain_supernode_exit, console=console)
            return
        except ServiceExited as err:
            if NOT_ACTIVATED not in err.log or attempt == retries:
                raise
        finally:
            stop.set()
            guard.join(timeout=10)
        console.print(f"the SuperLink refused to activate this site's key; retrying in {wait_s:.0f} s (a SuperNode "
                      "that stopped uncleanly counts as online for up to a minute)", highlight=False)
        time.sleep(wait_s)
