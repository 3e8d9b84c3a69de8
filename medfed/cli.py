"""The ``medfed`` command line. Commands are thin: they build a :class:`RunConfig` and call a plain function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

# OpenMP threads that spin while waiting make CPU steps erratic on shared 2-core machines; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from medfed.config import RunConfig, from_flat, parse_overrides, to_flat  # noqa: E402
from medfed.errors import MedfedError  # noqa: E402

app = typer.Typer(
    name="medfed",
    help="Federated, differentially private diffusion models for hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any config key, e.g. --set train.lr=1e-4 (see `medfed config`)."),
]


def build_config(options: dict[str, object | None], sets: list[str] | None) -> RunConfig:
    """Layer explicit CLI options (``None`` = not given) and ``--set`` overrides over the defaults."""
    flat: dict[str, object] = {k: v for k, v in options.items() if v is not None}
    flat.update(parse_overrides(sets or []))
    return from_flat(flat)


@app.command()
def config(
    sets: SetOption = None,
) -> None:
    """Print every config key with its value (defaults, or with --set overrides applied)."""
    cfg = build_config({}, sets)
    for key, value in to_flat(cfg).items():
        console.print(f"{key} = {value!r}", highlight=False)


@app.command()
def train(
    centralized: Annotated[bool, typer.Option("--centralized", help="Train on one machine (the paper's "
                                              "baseline). Federated training is `medfed run`.")] = True,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (data.dataset).")] = None,
    data_path: Annotated[Optional[str], typer.Option(help="Dataset file or folder (data.path).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this side (data.image-size).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="UNet preset (model.preset).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (train.steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (train.batch-size).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (train.lr).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (train.seed).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (train.device).")] = None,
    download: Annotated[Optional[bool], typer.Option("--download", help="Allow torchvision downloads.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Parent folder of run folders (output.dir).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run folder name (output.name).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the run's latest "
                                                  "checkpoint.")] = None,
    sets: SetOption = None,
) -> None:
    """Train a DDPM on one machine; writes checkpoints, metrics.jsonl and sample grids to a run folder."""
    from medfed.centralized import train_centralized

    if not centralized:
        raise MedfedError("federated training is `medfed run`; `medfed train` is centralized only")
    cfg = build_config({"data.dataset": dataset, "data.path": data_path, "data.image-size": image_size,
                        "data.download": download, "model.preset": preset, "train.steps": steps,
                        "train.batch-size": batch_size, "train.lr": lr, "train.seed": seed, "train.device": device,
                        "output.dir": out, "output.name": name, "output.resume": resume}, sets)
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
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (data.dataset).")] = None,
    data_path: Annotated[Optional[str], typer.Option(help="Dataset file or folder (data.path).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this side (data.image-size).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="UNet preset (model.preset).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (train.batch-size).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (train.lr).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (train.seed).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (train.device).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Parent folder of run folders (output.dir).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run folder name (output.name).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue an interrupted run from its "
                                                  "last checkpoint.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon each site plans for the run "
                                                     "(privacy.target-epsilon).")] = None,
    no_privacy: Annotated[bool, typer.Option("--no-privacy", help="Train WITHOUT differential privacy; every "
                                             "output is labelled NOT PRIVATE.")] = False,
    no_secure_aggregation: Annotated[bool, typer.Option("--no-secure-aggregation", help="Let the server see "
                                                        "each site's update (no SecAgg+).")] = False,
    parallel_sites: Annotated[int, typer.Option(help="Sites training at once (Ray actors).")] = 1,
    cpus_per_site: Annotated[int, typer.Option(help="CPU threads per training site.")] = 2,
    sets: SetOption = None,
) -> None:
    """Federated training of N simulated sites on this machine (Flower simulation engine)."""
    from medfed.federation.simulation import run_simulation

    cfg = build_config({"federation.num-sites": sites, "federation.rounds": rounds,
                        "federation.local-epochs": local_epochs, "federation.partition": partition,
                        "federation.dirichlet-beta": beta, "data.dataset": dataset, "data.path": data_path,
                        "data.image-size": image_size, "model.preset": preset, "train.batch-size": batch_size,
                        "train.lr": lr, "train.seed": seed, "train.device": device, "output.dir": out,
                        "output.name": name, "output.resume": resume, "privacy.target-epsilon": epsilon,
                        "privacy.enabled": False if no_privacy else None,
                        "secagg.enabled": False if no_secure_aggregation else None}, sets)
    result = run_simulation(cfg, parallel_sites=parallel_sites, cpus_per_site=cpus_per_site)
    console.print(f"run folder: {result.root}")
    console.print(result.summary_path.read_text(), highlight=False)


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
) -> None:
    """Generate images from a checkpoint: one PNG per image plus grid.png."""
    from medfed.generate import generate_from_checkpoint

    written = generate_from_checkpoint(checkpoint, num=num, out=out, sampler=sampler, steps=steps, seed=seed,
                                       batch_size=batch_size, device=device, precision=precision, compile=compile)
    console.print(f"wrote {num} images and {written / 'grid.png'}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Parent folder of the demo's run folder.")] = "runs",
    name: Annotated[str, typer.Option(help="Run folder name.")] = "demo",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """The main job end to end on the embedded real dataset (5,000 MNIST digits shipped in a pip wheel)."""
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


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except MedfedError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
