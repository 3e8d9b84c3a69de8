"""A hospital site's side of a deployment: its folder, key pair, registration request and SuperNode.

A site folder holds ``site.toml`` (:mod:`medfed.deploy.sitecfg`), the coordinator's ``ca.crt``, the site's key
pair ``site-key`` (0600) / ``site-key.pub``, the privacy state folder (``state/``, 0700, unless configured
elsewhere), the SuperNode's logs (``logs/``) and Flower's working folder (``flwr-home/``).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from medfed.config import DataConfig
from medfed.deploy.foreground import NOT_ACTIVATED, ServiceExited, explain_supernode_exit, log_size, serve
from medfed.deploy.pki import (SiteKeyPair, check_private_mode, create_site_key, load_certificate,
                               load_site_public_key, public_key_fingerprint)
from medfed.deploy.sitecfg import SITE_FILE, SiteConfig, site_config_path, write_site_config
from medfed.errors import ConfigError, DatasetError, MedfedError
from medfed.federation.deployment import start_supernode
from medfed.federation.processes import ProcessSession

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


def init_site(folder: Path, *, name: str, superlink: str, ca_cert: Path, data_path: Path, data_format: str,
              cap_epsilon: float, cap_delta: float | None = None, state_dir: Path | None = None,
              runtime_port: int = 9094) -> SiteConfig:
    """Create a site folder: a copy of the coordinator's CA certificate, a new key pair, ``site.toml`` and the
    state folder. Refuses to touch a folder that already holds a site configuration."""
    folder = Path(folder).expanduser().resolve()
    if (folder / SITE_FILE).exists():
        raise ConfigError(f"{folder / SITE_FILE}: exists; edit it, or use `medfed site rotate-key` for a new key")
    load_certificate(ca_cert)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg = SiteConfig(name=name, superlink=superlink, ca_cert=folder / "ca.crt", private_key=folder / KEY_FILE,
                     data_path=Path(data_path).expanduser().resolve(), data_format=data_format,
                     state_dir=Path(state_dir).expanduser().resolve() if state_dir else folder / "state",
                     cap_epsilon=cap_epsilon, cap_delta=cap_delta, runtime_port=runtime_port)
    write_site_config(cfg, folder / SITE_FILE)  # validates before any key is made
    if Path(ca_cert).resolve() != cfg.ca_cert:
        shutil.copyfile(ca_cert, cfg.ca_cert)
    create_site_key(cfg.private_key, comment=name)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return cfg


def public_key_path(cfg: SiteConfig) -> Path:
    return cfg.private_key.with_name(cfg.private_key.name + ".pub")


def registration_request(cfg: SiteConfig) -> RegistrationRequest:
    pub = public_key_path(cfg)
    load_site_public_key(pub)
    return RegistrationRequest(name=cfg.name, public_key=pub, public_key_text=pub.read_text().strip(),
                               fingerprint=public_key_fingerprint(pub))


def rotate_site_key(cfg: SiteConfig) -> tuple[SiteKeyPair, SiteKeyPair]:
    """Keep the current key pair as ``*.old`` and make a new one; returns ``(old, new)``. The old key works
    until the coordinator revokes it (``medfed server register-site NEW.pub --name NAME --replace``)."""
    old = SiteKeyPair(private=cfg.private_key.with_name(cfg.private_key.name + ".old"),
                      public=cfg.private_key.with_name(cfg.private_key.name + ".pub.old"))
    if old.private.exists():
        raise ConfigError(f"{old.private}: a previous rotation is not finished; delete it once the coordinator "
                          "has revoked the old key")
    cfg.private_key.rename(old.private)
    public_key_path(cfg).rename(old.public)
    return old, create_site_key(cfg.private_key, comment=cfg.name)


def check_site_files(cfg: SiteConfig) -> None:
    """The CA certificate loads, the private key exists and only its owner can read it, the state folder exists
    (created 0700 when missing)."""
    load_certificate(cfg.ca_cert)
    check_private_mode(cfg.private_key)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"privacy.state-dir {cfg.state_dir}: cannot be created ({err.strerror})") from None


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
               max_wait_time: float | None = None) -> subprocess.Popen:
    """Start the site's SuperNode: TLS against ``ca_cert``, authenticated with its key, ``--node-config`` from
    the site config. Returns at once; the SuperNode connects out and keeps reconnecting (or gives up after
    ``max_wait_time`` seconds without a connection)."""
    check_site_files(cfg)
    return start_supernode(session, cfg.superlink, cfg.runtime_port, cfg.node_config(), ca_cert=cfg.ca_cert,
                           auth_key=cfg.private_key, name=name, max_wait_time=max_wait_time)


ACTIVATION_RETRIES = 2
ACTIVATION_WAIT_S = 35.0
"""A SuperNode that stopped uncleanly (killed, power loss) stays online at the SuperLink for two heartbeat
intervals (2 x 30 s) and its key cannot be activated again until then."""


def run_site(session: ProcessSession, cfg: SiteConfig, console: Console, *, retries: int = ACTIVATION_RETRIES,
             wait_s: float = ACTIVATION_WAIT_S) -> None:
    """Run the site's SuperNode in the foreground until Ctrl-C/SIGTERM. A refused activation is retried
    ``retries`` times, ``wait_s`` apart, since it also happens right after an unclean stop.

    Raises:
        ServiceExited: the SuperNode stopped on its own (refused key, TLS failure, revoked), with the reason.
    """
    for attempt in range(retries + 1):
        offset = log_size(session, SUPERNODE)
        proc = start_site(session, cfg)
        console.print(f"site '{cfg.name}' connecting out to {cfg.superlink} (TLS, key {cfg.private_key.name})",
                      highlight=False)
        try:
            serve(session, SUPERNODE, proc, log_offset=offset, explain=explain_supernode_exit, console=console)
            return
        except ServiceExited as err:
            if NOT_ACTIVATED not in err.log or attempt == retries:
                raise
        console.print(f"the SuperLink refused to activate this site's key; retrying in {wait_s:.0f} s (a SuperNode "
                      "that stopped uncleanly counts as online for up to a minute)", highlight=False)
        time.sleep(wait_s)
