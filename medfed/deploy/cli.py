"""``medfed server`` (the coordinator) and ``medfed site`` (a hospital): deployment over TLS with site keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from medfed.errors import MedfedError

if TYPE_CHECKING:
    from medfed.deploy.hospital import RegistrationRequest

server_app = typer.Typer(help="The coordinator: CA and TLS, the SuperLink, site keys, runs.", no_args_is_help=True)
site_app = typer.Typer(help="A hospital site: key pair, site config, the SuperNode.", no_args_is_help=True)
console = Console(soft_wrap=True, highlight=False)

ServerDirOption = Annotated[Path, typer.Option("--dir", "-d", envvar="MEDFED_SERVER_DIR",
                                               help="The server folder (or set MEDFED_SERVER_DIR).")]
SiteDirOption = Annotated[Path, typer.Option("--dir", "-d", envvar="MEDFED_SITE_DIR",
                                             help="The site folder (or set MEDFED_SITE_DIR).")]


# --- medfed server ----------------------------------------------------------------------------------------


@server_app.command("init")
def server_init(
    folder: ServerDirOption,
    name: Annotated[Optional[list[str]], typer.Option(
        "--name", help="Host name or IP address sites use to reach the SuperLink (repeatable); the server "
                       "certificate covers these plus localhost and 127.0.0.1.")] = None,
    host: Annotated[Optional[str], typer.Option(
        help="Address the SuperLink binds to. Default 127.0.0.1 (with --renew-cert: the current one): this machine "
             "only, since Flower's Control API on the same port has no authentication; give the interface the "
             "sites reach (or 0.0.0.0) and firewall the port to the sites' addresses.")] = None,
    port: Annotated[int, typer.Option(help="The one TCP port sites connect to.")] = 9092,
    days: Annotated[int, typer.Option(help="Validity of the server certificate in days.")] = 825,
    renew_cert: Annotated[bool, typer.Option("--renew-cert", help="Keep the CA, issue a new server certificate "
                                             "(e.g. before it expires or for new names).")] = False,
) -> None:
    """Create the CA, the SuperLink's TLS certificate and the flwr CLI connection in a server folder."""
    from medfed.deploy.pki import certificate_expiry, certificate_fingerprint, certificate_names
    from medfed.deploy.coordinator import bind_address_note, init_server, read_settings

    sd = init_server(folder, name or [], host=host, port=port, days=days, renew_cert=renew_cert)
    settings = read_settings(sd)
    console.print(f"server folder: {sd.root}")
    console.print(f"CA certificate (send it to every site): {sd.ca.cert}")
    console.print(f"  SHA-256 fingerprint (sites confirm it with you): {certificate_fingerprint(sd.ca.cert)}")
    console.print(f"CA key (0600; keep it offline once the server certificate is issued): {sd.ca.key}")
    names = ", ".join(certificate_names(sd.server_cert))
    console.print(f"server certificate: {sd.server_cert}, valid for {names} until "
                  f"{certificate_expiry(sd.server_cert):%Y-%m-%d}")
    console.print(f"SuperLink will listen on {settings.host}:{settings.port}; start it with "
                  f"`medfed server start --dir {sd.root}`")
    console.print(bind_address_note(settings.host))


@server_app.command("start")
def server_start(folder: ServerDirOption) -> None:
    """Run the SuperLink (TLS, site authentication, persistent database) in the foreground until Ctrl-C."""
    from medfed.deploy.foreground import log_size, serve
    from medfed.deploy.coordinator import SUPERLINK, read_settings, server_dir, start_server
    from medfed.launch.processes import exit_on_sigterm

    sd = server_dir(folder)
    settings = read_settings(sd)
    with exit_on_sigterm(), sd.session() as session:
        offset = log_size(session, SUPERLINK)
        proc = start_server(session, sd)
        console.print(f"SuperLink listening on {settings.host}:{settings.port} (TLS, site authentication on); "
                      f"database {sd.database}")
        serve(session, SUPERLINK, proc, log_offset=offset)


@server_app.command("register-site")
def register_site(
    public_key: Annotated[Path, typer.Argument(help="The site's public key file (site-key.pub).")],
    name: Annotated[str, typer.Option(help="The site's name (as in its site.toml).")],
    folder: ServerDirOption,
    fingerprint: Annotated[Optional[str], typer.Option(help="The fingerprint the site read out to you; the key "
                                                       "must match it.")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Key rotation: revoke the site's current key once "
                                          "this one is registered.")] = False,
) -> None:
    """Allow a site's key to connect (the SuperLink must be running)."""
    from medfed.deploy.pki import public_key_fingerprint
    from medfed.deploy.coordinator import register_site as register, server_dir

    if fingerprint is None:
        console.print(f"key fingerprint {public_key_fingerprint(public_key)}: confirm it with the site out of band "
                      "(or pass --fingerprint)")
    record = register(server_dir(folder), public_key, name, fingerprint=fingerprint, replace=replace)
    console.print(f"registered site '{record.name}' as node {record.node_id} ({record.fingerprint})")


@server_app.command("revoke-site")
def revoke_site(
    name: Annotated[str, typer.Argument(help="The site's name.")],
    folder: ServerDirOption,
    node_id: Annotated[Optional[int], typer.Option(help="Revoke only this registration of the site.")] = None,
) -> None:
    """Revoke a site's key: its SuperNode is refused from its next request on."""
    from medfed.deploy.coordinator import revoke_site as revoke, server_dir

    for r in revoke(server_dir(folder), name, node_id=node_id):
        console.print(f"revoked site '{r.name}' (node {r.node_id}, {r.fingerprint}) at {r.revoked_at}")


@server_app.command("sites")
def sites(folder: ServerDirOption) -> None:
    """Registered site keys and whether their SuperNodes are online (the SuperLink must be running)."""
    from medfed.deploy.coordinator import server_dir, site_table

    rows = site_table(server_dir(folder))
    if not rows:
        console.print("no site registered yet")
    for r in rows:
        revoked = f"  revoked {r['revoked_at']}" if r["revoked_at"] else ""
        console.print(f"{r['name']:<24} node {r['node_id']:<21} {r['status']:<13} {r['fingerprint']}  "
                      f"registered {r['registered_at']}{revoked}")


@server_app.command("run")
def server_run(
    folder: ServerDirOption,
    sites: Annotated[int, typer.Option(help="Registered sites expected (federation.num-sites).")],
    image_size: Annotated[int, typer.Option(help="Image side every site resizes to (data.image-size).")],
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB) (data.channels).")],
    rounds: Annotated[Optional[int], typer.Option(help="FedAvg rounds (federation.rounds).")] = None,
    min_sites: Annotated[Optional[int], typer.Option(help="Sites a round needs (federation.min-sites; default: "
                                                     "all).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="UNet preset (model.preset).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (train.batch-size).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run folder name (output.name).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Parent folder of run folders (default: <dir>/runs).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any config key, e.g. --set "
                                                      "privacy.target-epsilon=4 (see `medfed config`).")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML file of config keys (a run "
                                                        "folder's run.toml works); options and --set override "
                                                        "it.")] = None,
) -> None:
    """Submit a federated run to the running SuperLink and follow it round by round (Ctrl-C stops following;
    the run goes on: `flwr stop RUN_ID medfed` stops it)."""
    from medfed.config import build_config

    cfg = build_config({"--sites": sites, "--image-size": image_size, "--channels": channels, "--rounds": rounds,
                        "--min-sites": min_sites, "--preset": preset, "--batch-size": batch_size, "--name": name,
                        "--out": out}, sets, config_file)
    from medfed.deploy.coordinator import server_dir, submit_deployed_run

    sd = server_dir(folder)
    run_id, run, status = submit_deployed_run(sd, cfg)
    console.print(f"run {run_id}: {status.get('status')}; run folder {run.root}")
    for record in run.rounds():
        console.print(record.summary_line(), highlight=False, markup=False)
    run.require_rounds(cfg.federation.rounds)


@server_app.command("rounds")
def rounds(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Which sites took part in each round, which refused or were missing, and why (reason codes)."""
    from medfed.runs import RunDir

    run = RunDir(run_dir)
    if not run.metrics_path.exists():
        raise MedfedError(f"{run.metrics_path}: not a run folder (no metrics.jsonl)")
    for record in run.rounds():
        console.print(record.summary_line(), highlight=False, markup=False)


# --- medfed site ------------------------------------------------------------------------------------------


@site_app.command("init")
def site_init(
    folder: SiteDirOption,
    name: Annotated[str, typer.Option(help="The site's display name (shown in the coordinator's metrics).")],
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink as host:port.")],
    ca_cert: Annotated[Path, typer.Option(help="The coordinator's CA certificate (ca.crt); copied into the site "
                                          "folder.")],
    data: Annotated[Path, typer.Option(help="The site's image file or folder.")],
    data_format: Annotated[str, typer.Option("--format", help="npz, folder (PNG/JPEG), dicom, nifti, idx, ...")],
    cap_epsilon: Annotated[float, typer.Option(help="The privacy cap: total epsilon allowed over all runs.")],
    delta: Annotated[float, typer.Option(help="The site's delta (policy.delta): every run's privacy.delta must "
                                         "equal it.")] = 1e-5,
    dataset_size: Annotated[Optional[int], typer.Option(help="The image count the site declares public "
                                                        "(policy.dataset-size; default: counted now).")] = None,
    min_sites_per_round: Annotated[int, typer.Option(help="Refuse rounds over fewer sites "
                                                     "(policy.min-sites-per-round).")] = 3,
    share_evaluation: Annotated[bool, typer.Option("--share-evaluation", help="Answer federated evaluation "
                                                   "(policy.share-evaluation; outside the DP guarantee).")] = False,
    state_dir: Annotated[Optional[Path], typer.Option(help="Where the privacy ledger lives (default: "
                                                      "<dir>/state).")] = None,
    runtime_port: Annotated[int, typer.Option(help="Local port of the SuperNode's runtime API (127.0.0.1; "
                                              "distinct per site on one machine).")] = 9094,
) -> None:
    """Create a site folder: site.toml, a new ECDSA key pair (private key 0600) and the state folder."""
    from medfed.contracts import SitePolicy
    from medfed.deploy.pki import certificate_fingerprint
    from medfed.deploy.hospital import init_site, registration_request

    cfg = init_site(folder, name=name, superlink=superlink, ca_cert=ca_cert, data_path=data,
                    data_format=data_format, cap_epsilon=cap_epsilon, state_dir=state_dir, runtime_port=runtime_port,
                    policy=SitePolicy(delta=delta, dataset_size=dataset_size or 0,
                                      min_sites_per_round=min_sites_per_round, share_evaluation=share_evaluation))
    console.print(f"site folder: {cfg.private_key.parent}")
    console.print(f"CA certificate SHA-256 fingerprint (confirm it with the coordinator): "
                  f"{certificate_fingerprint(cfg.ca_cert)}")
    console.print(f"private key (stays here, 0600): {cfg.private_key}")
    _print_request(registration_request(cfg))


def _print_request(request: RegistrationRequest) -> None:
    console.print(f"public key for the coordinator (not secret; send it as {request.name}.pub): "
                  f"{request.public_key}")
    console.print(f"  {request.public_key_text}")
    console.print(f"fingerprint (read it to the coordinator out of band): {request.fingerprint}")
    console.print(f"the coordinator runs: {request.coordinator_command()}")


@site_app.command("register")
def site_register(
    folder: SiteDirOption,
    out: Annotated[Optional[Path], typer.Option(help="Also copy the public key here, named for the site.")] = None,
    server_dir: Annotated[Optional[Path], typer.Option(help="Register directly through this server folder (when "
                                                       "the coordinator's operator runs it).")] = None,
) -> None:
    """Show (or export) what the site sends the coordinator: its public key and fingerprint."""
    import shutil

    from medfed.deploy.coordinator import register_site as register, server_dir as open_server_dir
    from medfed.deploy.sitecfg import read_site_config
    from medfed.deploy.hospital import registration_request

    request = registration_request(read_site_config(folder))
    _print_request(request)
    if out is not None:
        target = out / f"{request.name}.pub" if out.is_dir() else out
        shutil.copyfile(request.public_key, target)
        console.print(f"public key copied to {target}")
    if server_dir is not None:
        record = register(open_server_dir(server_dir), request.public_key, request.name,
                          fingerprint=request.fingerprint)
        console.print(f"registered site '{record.name}' as node {record.node_id}")


@site_app.command("start")
def site_start(folder: SiteDirOption) -> None:
    """Check the site's data and keys, then run its SuperNode (TLS, authenticated) until Ctrl-C."""
    from medfed.deploy.app_guard import approvals_path
    from medfed.deploy.hospital import check_site_data, check_site_files, run_site, site_session
    from medfed.deploy.sitecfg import read_site_config, site_config_path
    from medfed.launch.processes import exit_on_sigterm
    from medfed.privacy.ledger import site_ledger

    cfg = read_site_config(folder)
    check_site_files(cfg)
    console.print(f"checking {cfg.data_path} ({cfg.data_format}) ...")
    check = check_site_data(cfg)
    console.print(f"data: {check.images} images (declared in site.toml: policy.dataset-size = "
                  f"{cfg.policy.dataset_size})")
    if cfg.policy.require_dp and cfg.policy.dataset_size <= 0:
        raise MedfedError(f"{site_config_path(folder)}: policy.dataset-size is not set; declare the site's image "
                          f"count ({check.images} now) after reviewing the data (it is public: it sets the DP "
                          "sample rate and steps)")
    if cfg.policy.dataset_size and check.images != cfg.policy.dataset_size:
        console.print(f"[yellow]warning:[/] {site_config_path(folder)}: policy.dataset-size = "
                      f"{cfg.policy.dataset_size} but {cfg.data_path} holds {check.images} images. The DP guarantee "
                      "holds either way (sample rate and steps come from the declared size); review the data and "
                      "update the declared size so FedAvg weighs this site correctly.", highlight=False)
    relaxed = cfg.policy.relaxed()
    console.print(f"policy: {'strict defaults' if not relaxed else 'RELAXED ' + ', '.join(relaxed)}; delta "
                  f"{cfg.policy.delta:g}; share-evaluation {str(cfg.policy.share_evaluation).lower()}",
                  highlight=False)
    ledger = site_ledger(cfg.state_dir)
    if ledger.path.exists():
        from medfed.privacy.report import from_ledger

        spent = from_ledger(cfg.state_dir)
        console.print(f"privacy ledger {ledger.path}: intact, epsilon spent {spent.spent:.4f} of cap "
                      f"{cfg.cap_epsilon:g}, {len(spent.rows)} rounds, {len(spent.refusals)} refusals")
    else:
        console.print(f"privacy ledger {ledger.path}: no rounds yet (cap epsilon {cfg.cap_epsilon:g})")
    with exit_on_sigterm(), site_session(folder) as session:
        run_site(session, cfg, console, approvals=approvals_path(site_config_path(folder).resolve().parent))


@site_app.command("approve-app")
def approve_app(
    sha256: Annotated[str, typer.Argument(help="The app bundle's SHA-256, as `medfed site start` logged it when it "
                                          "refused the bundle (kept in <dir>/logs/refused-apps/ for inspection).")],
    folder: SiteDirOption,
    note: Annotated[str, typer.Option(help="Why it was approved (kept with the hash).")] = "",
) -> None:
    """Let this site take part in runs of an app bundle that is not medfed's own (e.g. written by another medfed
    version). The site still runs its own installed ClientApp; bundles naming other components stay refused."""
    from medfed.deploy.app_guard import approve_app as approve
    from medfed.deploy.sitecfg import read_site_config, site_config_path

    read_site_config(folder)
    path = approve(site_config_path(folder).resolve().parent, sha256, note)
    console.print(f"approved app bundle {sha256.strip().lower()} in {path} (takes effect with the next task)")


@site_app.command("rotate-key")
def rotate_key(folder: SiteDirOption) -> None:
    """Make a new key pair (the old one is kept as *.old until the coordinator revokes it)."""
    from medfed.deploy.hospital import registration_request, rotate_site_key
    from medfed.deploy.sitecfg import read_site_config

    cfg = read_site_config(folder)
    old, _new = rotate_site_key(cfg)
    console.print(f"old key kept as {old.private} until the coordinator has registered the new one")
    console.print(f"privacy ledger {cfg.state_dir}: key-rotation entry recorded, signed by the old key and naming "
                  "the new one (the ledger and the coordinator's anchor carry over)", highlight=False)
    request = registration_request(cfg)
    _print_request(request)
    console.print("the coordinator adds --replace, which revokes the old key; then restart `medfed site start`")
