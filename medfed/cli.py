"""The ``medfed`` command line. Commands are thin: they build a :class:`RunConfig` and call a plain function.

Every option and config value is checked here, before torch or Flower is imported and before any folder is made;
:func:`main` turns a :class:`MedfedError` into one ``error:`` line (exit 2) and any other exception into one line
naming a log file with the traceback (exit 1; ``medfed --debug`` prints it instead).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

# OpenMP threads that spin while waiting make CPU steps erratic on shared 2-core machines; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from medfed.config import (  # noqa: E402
    RunConfig,
    build_config,
    check_choice,
    check_device,
    describe_keys,
)
from medfed.errors import ConfigError, MedfedError, require  # noqa: E402

app = typer.Typer(
    name="medfed",
    help="Federated, differentially private diffusion models for hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
_debug = {"on": os.environ.get("MEDFED_DEBUG", "") not in ("", "0")}


def _show_version(value: bool) -> None:
    if value:
        from medfed import __version__

        typer.echo(f"medfed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print medfed's version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="On an unexpected error print the full traceback instead "
                                        "of writing it to a log file (or set MEDFED_DEBUG=1).")] = False,
) -> None:
    """Federated, differentially private diffusion models for hospitals."""
    if debug:
        _debug["on"] = True


# --- options shared by `train` and `run` (each names the config key it sets: medfed.config.OPTION_KEYS) -------

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any config key, e.g. --set train.lr=1e-4 (see `medfed config`)."),
]
ConfigFileOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="A TOML file of config keys (a run folder's run.toml works); options and "
                 "--set override it."),
]
DatasetOption = Annotated[Optional[str], typer.Option(help="Dataset name (data.dataset).")]
DataPathOption = Annotated[Optional[str], typer.Option(help="Dataset file or folder (data.path).")]
ImageSizeOption = Annotated[Optional[int], typer.Option(help="Resize images to this side (data.image-size).")]
PresetOption = Annotated[Optional[str], typer.Option(help="UNet preset (model.preset).")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="Batch size (train.batch-size).")]
LrOption = Annotated[Optional[float], typer.Option(help="Learning rate (train.lr).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Random seed (train.seed).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (train.device).")]
OutOption = Annotated[Optional[str], typer.Option(help="Parent folder of run folders (output.dir).")]
NameOption = Annotated[Optional[str], typer.Option(help="Run folder name (output.name).")]
ResumeOption = Annotated[Optional[bool], typer.Option("--resume", help="Continue from the run's latest "
                                                      "checkpoint (output.resume).")]


def run_options(dataset: str | None, data_path: str | None, image_size: int | None, preset: str | None,
                batch_size: int | None, lr: float | None, seed: int | None, device: str | None, out: str | None,
                name: str | None, resume: bool | None) -> dict[str, object | None]:
    """The options ``train`` and ``run`` share, by flag (see :data:`medfed.config.OPTION_KEYS`)."""
    return {"--dataset": dataset, "--data-path": data_path, "--image-size": image_size, "--preset": preset,
            "--batch-size": batch_size, "--lr": lr, "--seed": seed, "--device": device, "--out": out,
            "--name": name, "--resume": resume}


def check_inputs(cfg: RunConfig) -> None:
    """The files a run reads exist (``data.path``, ``federation.init-checkpoint``), checked before a run folder is
    made. Raises a one-line :class:`ConfigError` naming the key and path."""
    needs_path = cfg.data.dataset in ("npz", "idx", "folder", "dicom", "nifti") and not cfg.data.site_entries
    if needs_path and not cfg.data.path:
        raise ConfigError(f"config key 'data.path' must be set for data.dataset = {cfg.data.dataset} (--data-path)",
                          key="data.path")
    for key, value in (("data.path", cfg.data.path), ("federation.init-checkpoint", cfg.federation.init_checkpoint)):
        if value and not Path(value).expanduser().exists():
            option = " (--data-path)" if key == "data.path" else ""
            raise ConfigError(f"config key '{key}'{option}: {value} does not exist", key=key)


@app.command()
def config(
    prefix: Annotated[Optional[str], typer.Argument(help="Show only keys starting with this, e.g. `train` or "
                                                    "`privacy.delta`.")] = None,
    sets: SetOption = None,
    config_file: ConfigFileOption = None,
) -> None:
    """Print every config key with its value (defaults, a --config file, --set overrides), what it means and its
    allowed values."""
    cfg = build_config({}, sets, config_file)
    shown = [k for k in describe_keys(cfg) if not prefix or k.key.startswith(prefix)]
    if not shown:
        raise ConfigError(f"no config key starts with '{prefix}'")
    for info in shown:
        console.print(f"{info.key} = {info.value!r}", highlight=False)
        console.print(f"    {info.description}", highlight=False, style="dim")
        console.print(f"    {info.kind}{'; ' + info.allowed if info.allowed else ''}", highlight=False, style="dim")


@app.command()
def train(
    centralized: Annotated[bool, typer.Option("--centralized", help="Train on one machine (the paper's "
                                              "baseline). Federated training is `medfed run`.")] = True,
    dataset: DatasetOption = None,
    data_path: DataPathOption = None,
    image_size: ImageSizeOption = None,
    preset: PresetOption = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (train.steps).")] = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    seed: SeedOption = None,
    device: DeviceOption = None,
    download: Annotated[Optional[bool], typer.Option("--download", help="Allow torchvision downloads "
                                                     "(data.download).")] = None,
    out: OutOption = None,
    name: NameOption = None,
    resume: ResumeOption = None,
    config_file: ConfigFileOption = None,
    sets: SetOption = None,
) -> None:
    """Train a DDPM on one machine; writes checkpoints, metrics.jsonl and sample grids to a run folder."""
    if not centralized:
        raise MedfedError("federated training is `medfed run`; `medfed train` is centralized only")
    options = run_options(dataset, data_path, image_size, preset, batch_size, lr, seed, device, out, name, resume)
    cfg = build_config({**options, "--steps": steps, "--download": download}, sets, config_file)
    check_inputs(cfg)
    from medfed.centralized import train_centralized

    result = train_centralized(cfg)
    console.print(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} after {result.steps} steps")
    console.print(f"run folder: {result.run.root}\nsample grid: {result.grid}")


@app.command()
def run(
    sites: Annotated[Optional[int], typer.Option(help="Simulated hospital sites (federation.num-sites).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="FedAvg rounds (federation.rounds).")] = None,
    local_epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round "
                                                        "(federation.local-epochs).")] = None,
    partition: Annotated[Optional[str], typer.Option(help="iid or dirichlet (federation.partition).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Dirichlet concentration "
                                                  "(federation.dirichlet-beta).")] = None,
    dataset: DatasetOption = None,
    data_path: DataPathOption = None,
    image_size: ImageSizeOption = None,
    preset: PresetOption = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    seed: SeedOption = None,
    device: DeviceOption = None,
    out: OutOption = None,
    name: NameOption = None,
    resume: ResumeOption = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon each site plans for the run "
                                                     "(privacy.target-epsilon).")] = None,
    no_privacy: Annotated[bool, typer.Option("--no-privacy", help="Train WITHOUT differential privacy; every "
                                             "output is labelled NOT PRIVATE.")] = False,
    no_secure_aggregation: Annotated[bool, typer.Option("--no-secure-aggregation", help="Let the server see "
                                                        "each site's update (no SecAgg+).")] = False,
    parallel_sites: Annotated[int, typer.Option(help="Sites training at once (Ray actors).")] = 1,
    cpus_per_site: Annotated[int, typer.Option(help="CPU threads per training site.")] = 2,
    config_file: ConfigFileOption = None,
    sets: SetOption = None,
) -> None:
    """Federated training of N simulated sites on this machine (Flower simulation engine)."""
    require(parallel_sites >= 1, f"option --parallel-sites {parallel_sites}:", "must be >= 1")
    require(cpus_per_site >= 1, f"option --cpus-per-site {cpus_per_site}:", "must be >= 1")
    options = run_options(dataset, data_path, image_size, preset, batch_size, lr, seed, device, out, name, resume)
    # The simulated hospitals' policy is strict by default; these flags relax it explicitly, and say so.
    relaxed = (["policy.require-dp=false"] if no_privacy else []) + \
        (["policy.require-secure-aggregation=false"] if no_secure_aggregation else [])
    cfg = build_config({**options, "--sites": sites, "--rounds": rounds, "--local-epochs": local_epochs,
                        "--partition": partition, "--beta": beta, "--epsilon": epsilon,
                        "--no-privacy": False if no_privacy else None,
                        "--no-secure-aggregation": False if no_secure_aggregation else None},
                       [*relaxed, *(sets or [])], config_file)
    check_inputs(cfg)
    for key in relaxed:
        console.print(f"simulated sites' policy relaxed: {key.replace('=', ' = ')}", highlight=False)
    from medfed.launch.simulation import run_simulation

    result = run_simulation(cfg, parallel_sites=parallel_sites, cpus_per_site=cpus_per_site)
    console.print(f"run folder: {result.root}")
    for record in result.rounds():
        console.print(record.summary_line(), highlight=False, markup=False)
    result.require_rounds(cfg.federation.rounds)
    console.print(result.summary_path.read_text(), highlight=False)


def check_sample_options(checkpoint: Path, num: int, sampler: str | None, steps: int | None,
                         batch_size: int | None, device: str, precision: str, guidance: float | None) -> None:
    """``medfed sample``'s options, checked before torch loads; ``--steps`` against the checkpoint's own
    ``diffusion.timesteps`` is checked by :func:`medfed.generate.generate_from_checkpoint`."""
    require(checkpoint.is_file(), f"--checkpoint {checkpoint}:", "file does not exist" if not checkpoint.exists()
            else "is not a file")
    require(num >= 1, f"--num {num}:", "must be >= 1")
    require(steps is None or steps >= 1, f"--steps {steps}:", "must be >= 1")
    require(batch_size is None or batch_size >= 1, f"--batch-size {batch_size}:", "must be >= 1")
    require(guidance is None or guidance >= 0, f"--guidance {guidance}:", "must be >= 0")
    if sampler is not None:
        check_choice(sampler, ("ddpm", "ddim"), "--sampler")
    check_choice(precision, ("auto", "float32", "bfloat16", "float16"), "--precision")
    check_device(device, "--device")


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint written by `medfed train` or `medfed run`.")],
    num: Annotated[int, typer.Option(help="Number of images.")] = 64,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm (all T steps) or ddim.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <run>/samples/<checkpoint>).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Images denoised together (default: 64 on CPU, up to 1024 on GPU). Seeded images depend on it.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto (bfloat16 on CPUs with AMX, else float32), float32 (exact), bfloat16 or float16.")] = "auto",
    compile: Annotated[bool, typer.Option(
        help="torch.compile the UNet first (1-3 min on a CPU the first time; pays off for long DDPM runs).")] = False,
    class_name: Annotated[Optional[str], typer.Option("--class", help=(
        "Class-conditional checkpoints: draw this class, by name (the run's data.classes) or ID. Without it every "
        "class is drawn, --num rounded up to a multiple of the class count, one row per class in grid.png."))] = None,
    guidance: Annotated[Optional[float], typer.Option(help=(
        "Classifier-free guidance scale w >= 0 of class-conditional checkpoints, eps = (1 + w) eps_class - "
        "w eps_unconditional (default: the run's diffusion.guidance)."))] = None,
) -> None:
    """Generate images from a checkpoint: one PNG per image plus grid.png."""
    check_sample_options(checkpoint, num, sampler, steps, batch_size, device, precision, guidance)
    from medfed.generate import generate_from_checkpoint

    written = generate_from_checkpoint(checkpoint, num=num, out=out, sampler=sampler, steps=steps, seed=seed,
                                       batch_size=batch_size, device=device, precision=precision, compile=compile,
                                       class_name=class_name, guidance=guidance)
    count = sum(1 for p in written.glob("*.png") if p.stem.isdigit())
    console.print(f"wrote {count} images and {written / 'grid.png'}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Parent folder of the demo's run folder.")] = "runs",
    name: Annotated[str, typer.Option(help="Run folder name.")] = "demo",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """The main job end to end on the embedded real dataset (5,000 MNIST digits shipped in a pip wheel)."""
    check_device(device, "--device")
    from medfed.demo import run_demo

    run_demo(out=out, name=name, device=device)


from medfed.clinician_review import cli as review_cli  # noqa: E402
app.add_typer(review_cli.app, name="review")
from medfed.datasets import cli as data_cli  # noqa: E402
app.add_typer(data_cli.app, name="data")
from medfed.evaluation import cli as evaluation_cli  # noqa: E402
app.add_typer(evaluation_cli.app, name="evaluate")
from medfed.privacy import cli as privacy_cli  # noqa: E402
app.add_typer(privacy_cli.app, name="privacy")

from medfed.deploy import cli as deploy_cli  # noqa: E402
app.add_typer(deploy_cli.server_app, name="server")
app.add_typer(deploy_cli.site_app, name="site")
from medfed.studies import cli as studies_cli  # noqa: E402
app.add_typer(studies_cli.app, name="study")


def _error(message: str) -> None:
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def _unexpected(err: BaseException) -> int:
    """One line naming what failed and the log file with the traceback (or the traceback with --debug)."""
    import traceback

    from medfed.logs import write_crash_log

    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" in {Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else ""
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    what = f"{type(err).__name__}{': ' + first_line if first_line else ''}{where}"
    command = ["medfed", *sys.argv[1:]]
    if _debug["on"]:
        traceback.print_exception(err)
        _error(f"unexpected {what}")
        return 1
    try:
        log = write_crash_log(err, command)
    except OSError as log_err:
        traceback.print_exception(err)
        _error(f"unexpected {what} (could not write a log file: {log_err})")
        return 1
    _error(f"unexpected {what} (full traceback: {log})")
    return 1


def main() -> None:
    """Console entry point. A :class:`MedfedError` or bad option prints one ``error:`` line (exit 2), Ctrl-C
    prints ``interrupted`` (exit 130), anything else one line naming the log file with its traceback (exit 1)."""
    from medfed.logs import quiet_third_party

    quiet_third_party()
    try:
        code = app(standalone_mode=False)
    except MedfedError as err:
        _error(str(err))
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as err:
        err.show()
        sys.exit(err.exit_code)
    except click.UsageError as err:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        _error(f"{' '.join(err.format_message().split())}{where}")
        sys.exit(err.exit_code)
    except click.ClickException as err:
        _error(" ".join(err.format_message().split()))
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _error("interrupted")
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place every other failure becomes one line
        sys.exit(_unexpected(err))
    if code == 130:  # typer turns Ctrl-C inside a command into exit status 130
        _error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
