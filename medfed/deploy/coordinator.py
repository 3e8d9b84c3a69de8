"""The coordinator's side of a deployment: its folder, TLS, the SuperLink, the site registry and runs.

A server folder holds::

    server.toml        bind address, port and the names sites use to reach the SuperLink
    ca/ca.crt          the CA certificate every site trusts (send it to the sites)
    ca/ca.key          the CA key (0600; only needed to renew the server certificate: keep it offline)
    tls/server.crt     the SuperLink's certificate (SANs: server.toml's names, localhost, 127.0.0.1)
    tls/server.key     its key (0600)
    superlink.db       the SuperLink's database (registered site keys, runs), kept across restarts
    sites.json         who registered which key under which name, and when it was revoked
    anchors.json       the last heads of each site's privacy ledger the coordinator saw (medfed.privacy.anchors)
    flwr-home/         the flwr CLI's folder: config.toml with the ``medfed`` connection
    logs/superlink.log the SuperLink's log
    runs/<name>/       each run's folder (metrics.jsonl: who took part in each round; checkpoints; summary)

The folder is 0700 and every file medfed or Flower writes in it is 0600 (:func:`medfed.deploy.pki.private_files`
sets the umask before the SuperLink starts, so its database, logs and the ServerApp's run folders are private);
only the certificates (``*.crt``) are 0644.

Everything goes through Flower's own processes and CLI (``flower-superlink``, ``flwr supernode register``,
``flwr run``); the thin Flower app holds only ``pyproject.toml``, so sites run their own installed medfed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from medfed.config import RunConfig
from medfed.deploy.pki import (CertificateAuthority, create_ca, issue_server_cert, load_site_public_key,
                               make_private_dir, private_files, public_key_fingerprint)
from medfed.errors import ConfigError, MedfedError
from medfed.launch.deployment import TLSFiles, follow_run, start_superlink, submit_run, write_connection
from medfed.launch.flower_app import write_flower_app
from medfed.launch.processes import ProcessSession
from medfed.runs import RunDir, run_name

CONNECTION = "medfed"
SUPERLINK = "superlink"
DEFAULT_PORT = 9092


@dataclass(frozen=True)
class ServerSettings:
    """``server.toml``: where the SuperLink listens and which names its certificate covers."""

    host: str = "127.0.0.1"
    """Bind address: ``127.0.0.1`` (this machine only, the default), one interface's address, or ``0.0.0.0``
    (all interfaces). Flower 1.42's Control API (submit runs, register site keys) shares the port and has no
    authentication, so the SuperLink is reachable from elsewhere only when ``medfed server init --host`` says so."""
    port: int = DEFAULT_PORT
    """The one TCP port sites connect to (inbound at the coordinator only)."""
    names: tuple[str, ...] = ()
    """Host names / IP addresses sites use in their ``superlink`` setting (the certificate's SANs)."""

    @property
    def local_address(self) -> str:
        """Where the coordinator's own flwr CLI reaches the SuperLink."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerDir:
    """Paths of a coordinator's server folder."""

    root: Path

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(cert=self.root / "ca" / "ca.crt", key=self.root / "ca" / "ca.key")

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(ca_cert=self.ca.cert, server_cert=self.server_cert, server_key=self.server_key)

    @property
    def settings_path(self) -> Path:
        return self.root / "server.toml"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def registry(self) -> Path:
        return self.root / "sites.json"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def anchors(self) -> Path:
        """The coordinator's anchors of the sites' privacy ledgers (:class:`medfed.privacy.anchors.AnchorStore`)."""
        return self.root / "anchors.json"

    def session(self) -> ProcessSession:
        """The coordinator's process session (flwr CLI folder and logs inside the server folder)."""
        return ProcessSession(flwr_home=self.root / "flwr-home", log_dir=self.root / "logs")


def server_dir(root: Path) -> ServerDir:
    """An initialised server folder; raises :class:`ConfigError` if ``medfed server init`` has not run there."""
    sd = ServerDir(Path(root).expanduser().resolve())
    if not sd.settings_path.is_file():
        raise ConfigError(f"{sd.settings_path}: not a server folder (create one with `medfed server init`)")
    return sd


def read_settings(sd: ServerDir) -> ServerSettings:
    try:
        doc = tomllib.loads(sd.settings_path.read_text())
        settings = ServerSettings(host=str(doc["host"]), port=int(doc["port"]),
                                  names=tuple(str(n) for n in doc.get("names", [])))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{sd.settings_path}: not a valid server configuration ({err})") from None
    if not 0 < settings.port < 65536:
        raise ConfigError(f"{sd.settings_path}: 'port' must be a TCP port (1-65535)")
    return settings


LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


def bind_address_note(host: str) -> str:
    """What binding the SuperLink to ``host`` means, for ``medfed server init`` to print."""
    if host in LOCAL_HOSTS:
        return (f"bound to {host}: only this machine reaches the SuperLink, because Flower 1.42's Control API on "
                "the same port (submit runs, register keys) has no authentication. For remote sites, run "
                "`medfed server init --renew-cert --host <interface address>` and allow the port only from the "
                "sites' addresses (docs/deployment.md, section 2)")
    return (f"bound to {host}: anyone who reaches this port can submit runs and register keys (Flower 1.42's "
            "Control API has no authentication); allow it only from the sites' addresses (docs/deployment.md, "
            "section 2)")


@private_files
def init_server(root: Path, names: list[str], *, host: str | None = None, port: int = DEFAULT_PORT,
                days: int = 825, renew_cert: bool = False) -> ServerDir:
    """Create the CA (once), issue the SuperLink's certificate for ``names`` and write ``server.toml`` and the
    flwr CLI connection. With ``renew_cert`` an existing folder keeps its CA and gets a new server certificate
    (sites need nothing new). ``host`` is the bind address: by default ``127.0.0.1``, or the folder's current one
    when renewing (see :attr:`ServerSettings.host`)."""
    sd = ServerDir(Path(root).expanduser().resolve())
    if sd.settings_path.exists() and not renew_cert:
        raise ConfigError(f"{sd.settings_path}: exists; pass --renew-cert to issue a new server certificate")
    if host is None:
        host = read_settings(sd).host if sd.settings_path.exists() else ServerSettings().host
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is not a TCP port (1-65535)")
    make_private_dir(sd.root)
    if not sd.ca.cert.exists():
        create_ca(sd.ca.cert.parent)
    bind = [] if host in ("0.0.0.0", "::", "") else [host]
    settings = ServerSettings(host=host, port=port, names=tuple(dict.fromkeys([*names, *bind])))
    issue_server_cert(sd.ca, sd.server_cert, sd.server_key, settings.names, days=days, overwrite=renew_cert)
    sd.settings_path.write_text("# medfed server configuration (see docs/deployment.md)\n" + tomli_w.dumps(
        {"host": settings.host, "port": settings.port, "names": list(settings.names)}))
    with sd.session() as session:
        write_connection(session, CONNECTION, settings.local_address, sd.ca.cert)
    return sd


@private_files
def start_server(session: ProcessSession, sd: ServerDir, health_timeout: float = 60.0) -> subprocess.Popen:
    """Start the SuperLink with TLS, SuperNode authentication, the persistent database and no runtime
    dependency installation; returns once it answers ``/health`` over TLS. The server folder is made 0700 and
    the SuperLink (and the ServerApps it starts) write 0600 files."""
    settings = read_settings(sd)
    make_private_dir(sd.root)
    for private in (sd.database, sd.registry, sd.anchors):  # folders made before medfed set these modes
        if private.exists():
            private.chmod(0o600)
    return start_superlink(session, settings.port, tls=sd.tls, supernode_auth=True, database=sd.database,
                           host=settings.host, name=SUPERLINK, health_timeout=health_timeout)


# --- the site registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRecord:
    """One registration of a site key: Flower's node id for it, and when it was made and revoked."""

    name: str
    node_id: int
    fingerprint: str
    public_key: str
    registered_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def read_registry(sd: ServerDir) -> list[SiteRecord]:
    if not sd.registry.exists():
        return []
    try:
        return [SiteRecord(**r) for r in json.loads(sd.registry.read_text())["sites"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{sd.registry}: not a site registry ({err})") from None


@private_files
def write_registry(sd: ServerDir, records: list[SiteRecord]) -> None:
    tmp = sd.registry.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sites": [dataclasses.asdict(r) for r in records]}, indent=2) + "\n")
    os.replace(tmp, sd.registry)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def register_site(sd: ServerDir, public_key: Path, name: str, *, fingerprint: str | None = None,
                  replace: bool = False) -> SiteRecord:
    """Register a site's public key with the running SuperLink under ``name``.

    Args:
        fingerprint: the fingerprint the site read out (``medfed site register``); the key must match it.
        replace: key rotation: revoke the name's current key once the new one is registered.

    Raises:
        ConfigError: bad key, fingerprint mismatch, or the name already has an active key (without ``replace``).
    """
    public_key = Path(public_key).expanduser().resolve()
    load_site_public_key(public_key)
    actual = public_key_fingerprint(public_key)
    if fingerprint is not None and fingerprint.strip() != actual:
        raise ConfigError(f"{public_key}: fingerprint {actual} does not match the one the site gave ({fingerprint}); "
                          "do not register this key")
    records = read_registry(sd)
    previous = [r for r in records if r.name == name and r.active]
    if previous and not replace:
        raise ConfigError(f"site '{name}' already has an active key (node {previous[0].node_id}); pass --replace "
                          "to rotate it, or revoke it first")
    if any(r.fingerprint == actual and r.active for r in records):
        raise ConfigError(f"{public_key}: this key is already registered")
    with sd.session() as session:
        reply = session.flwr_json(["supernode", "register", str(public_key), CONNECTION, "--name", name])
    if not reply.get("success") or reply.get("node-id") is None:
        raise MedfedError(f"flwr supernode register did not register {public_key}: {json.dumps(reply)[:300]}")
    record = SiteRecord(name=name, node_id=int(reply["node-id"]), fingerprint=actual,
                        public_key=Path(public_key).read_text().strip(), registered_at=_now())
    write_registry(sd, [*records, record])
    for old in previous:
        revoke_site(sd, name, node_id=old.node_id)
    return record


def revoke_site(sd: ServerDir, name: str, *, node_id: int | None = None) -> list[SiteRecord]:
    """Unregister a site's active key(s) (or just ``node_id``): its SuperNode is refused from its next request.

    Raises:
        ConfigError: no active registration of that name (and node id).
    """
    records = read_registry(sd)
    targets = [r for r in records if r.name == name and r.active and node_id in (None, r.node_id)]
    if not targets:
        raise ConfigError(f"no active registration for site '{name}'" + (f" with node {node_id}" if node_id else "")
                          + f" in {sd.registry}")
    with sd.session() as session:
        for r in targets:
            session.flwr_json(["supernode", "unregister", str(r.node_id), CONNECTION])
    when = _now()
    revoked = [dataclasses.replace(r, revoked_at=when) for r in targets]
    by_id = {r.node_id: r for r in revoked}
    write_registry(sd, [by_id.get(r.node_id, r) if r.active else r for r in records])
    return revoked


def node_statuses(sd: ServerDir) -> dict[int, str]:
    """Flower's view of each node: ``registered``, ``online``, ``offline`` or ``unregistered``."""
    with sd.session() as session:
        nodes = session.flwr_json(["supernode", "list", CONNECTION, "--verbose"]).get("nodes", [])
    return {int(n["node-id"]): str(n["status"]) for n in nodes}


def site_table(sd: ServerDir) -> list[dict[str, Any]]:
    """Every registration with Flower's current status of its node."""
    status = node_statuses(sd)
    return [{"name": r.name, "node_id": r.node_id, "status": status.get(r.node_id, "unknown"),
             "fingerprint": r.fingerprint, "registered_at": r.registered_at, "revoked_at": r.revoked_at}
            for r in read_registry(sd)]


# --- runs -------------------------------------------------------------------------------------------------


def deployment_run_config(cfg: RunConfig, sd: ServerDir) -> RunConfig:
    """Fix what the server must know before any site reports: the image shape (it is not read from site data
    in deployment), an absolute run folder (default: the server folder's ``runs/``) and the coordinator's anchors of
    the sites' ledgers (``anchors.json``)."""
    from medfed.federation.site import federated_data_config

    federated_data_config(cfg)
    out = Path(cfg.output.dir).expanduser()
    out = out if cfg.output.dir != RunConfig().output.dir else sd.runs
    output = dataclasses.replace(cfg.output, dir=str(out.resolve()), name=run_name(cfg))
    federation = dataclasses.replace(cfg.federation, ledger_anchors=str(sd.anchors))
    return dataclasses.replace(cfg, output=output, federation=federation)


@private_files
def submit_deployed_run(sd: ServerDir, cfg: RunConfig, *, wait: bool = True, show_progress: bool = True,
                        timeout: float | None = None) -> tuple[int, RunDir, dict]:
    """Submit ``cfg`` to the running SuperLink as a thin Flower app (``pyproject.toml`` only) and, with
    ``wait``, follow it to the end; returns ``(run id, run folder, final flwr ls entry)``.

    Raises:
        ConfigError: image shape not set, or the run folder exists.
        MedfedError: the run did not reach ``finished:completed``.
    """
    cfg = deployment_run_config(cfg, sd)
    run = RunDir(Path(cfg.output.dir) / cfg.output.name)
    if run.config_path.exists() and not cfg.output.resume:
        raise ConfigError(f"{run.root}: run folder already exists; choose another --name")
    app = write_flower_app(run.root / "flower" / "app", cfg)
    timeout = timeout or cfg.federation.rounds * cfg.federation.round_timeout + 600
    with sd.session() as session:
        run_id = submit_run(session, app, CONNECTION)
        status = (follow_run(session, CONNECTION, run_id, run, cfg.federation.rounds, timeout,
                             show_progress=show_progress, label=f"run {run_id} ({cfg.federation.num_sites} sites)")
                  if wait else {"run-id": run_id, "status": "submitted"})
    return run_id, run, status
