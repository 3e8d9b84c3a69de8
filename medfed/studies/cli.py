"""``medfed study``: the three studies, each one command that writes ``study.json`` and ``report.md`` with plots."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Studies: number of clients, personalization, lightweight edge models. Each runs real "
                       "federated training and writes study.json, report.md and plots.", no_args_is_help=True)
console = Console(soft_wrap=True)

DataPath = Annotated[str, typer.Option(help="Real labelled images with train and test splits, e.g. "
                                       "../shared/data/medmnist/pneumoniamnist.npz.")]
Dataset = Annotated[Optional[str], typer.Option(help="Format of --data-path (npz, idx, folder, ...). Default npz.")]
Limit = Annotated[Optional[int], typer.Option(help="Training images in total over all sites (0 = the whole train "
                                              "split).")]
ImageSize = Annotated[Optional[int], typer.Option(help="Resize images to this side (0 = native).")]
Channels = Annotated[Optional[int], typer.Option(help="1 or 3 channels (0 = native).")]
Preset = Annotated[Optional[str], typer.Option(help="UNet preset of the federated runs.")]
Rounds = Annotated[Optional[int], typer.Option(help="FedAvg rounds per federated run.")]
LocalEpochs = Annotated[Optional[int], typer.Option(help="Local epochs per round.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Local batch size.")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate (AdamW).")]
Epsilon = Annotated[Optional[float], typer.Option(help="Epsilon each site plans for a federated run.")]
CapEpsilon = Annotated[Optional[float], typer.Option(help="Each simulated site's privacy cap (its ledger, all "
                                                     "stages).")]
FeatureNetwork = Annotated[Optional[str], typer.Option(help="classifier (train medfed's domain classifier on the "
                                                       "dataset's train split, default), fid-helper, inception, "
                                                       "or a classifier file from `medfed evaluate "
                                                       "train-features`.")]
ClassifierEpochs = Annotated[Optional[int], typer.Option(help="Training epochs of the domain classifier.")]
NumSamples = Annotated[Optional[int], typer.Option(help="Generated images behind each score.")]
SampleSteps = Annotated[Optional[int], typer.Option(help="DDIM steps of the samples scored.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of runs, splits, initial weights and sampling.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")]
ParallelSites = Annotated[Optional[int], typer.Option(help="Sites training at once (Ray actors).")]
CpusPerSite = Annotated[Optional[int], typer.Option(help="CPU threads per training site.")]
Full = Annotated[bool, typer.Option("--full", help="The whole grid at a larger size, for a GPU machine (hours on a "
                                    "CPU); options given explicitly still win.")]
Out = Annotated[Optional[Path], typer.Option(help="Study folder (default: runs/study-<name>-<timestamp>).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="A config key for every federated run, e.g. "
                                                   "--set privacy.accountant=prv (see `medfed config`).")]


def numbers(text: str | None, option: str, kind: type = int) -> tuple[Any, ...] | None:
    """``"2,5,10"`` -> ``(2, 5, 10)``; None stays None."""
    from medfed.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ConfigError(f"{option} '{text}': expected comma-separated {kind.__name__} values") from err


def words(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def config_options(dataset: str | None, limit: int | None, image_size: int | None, channels: int | None,
                   preset: str | None, rounds: int | None, local_epochs: int | None, batch_size: int | None,
                   lr: float | None, epsilon: float | None, cap_epsilon: float | None, seed: int | None,
                   device: str | None) -> dict[str, object | None]:
    """The shared options that set the study's base config, by flag (see
    :data:`medfed.config.OPTION_KEYS`); the others are study settings."""
    return {"--dataset": dataset, "--limit": limit, "--image-size": image_size, "--channels": channels,
            "--preset": preset, "--rounds": rounds, "--local-epochs": local_epochs, "--batch-size": batch_size,
            "--lr": lr, "--epsilon": epsilon, "--cap-epsilon": cap_epsilon, "--seed": seed, "--device": device}


def command_line() -> str:
    return shlex.join(["medfed", *sys.argv[1:]])


def finish(folder: Path) -> None:
    console.print((folder / "report.md").read_text(), highlight=False, markup=False)
    console.print(f"study folder: {folder}", highlight=False)


@app.command()
def clients(
    data_path: DataPath,
    sites: Annotated[Optional[str], typer.Option(help="Numbers of sites, comma-separated (default 3,5,10; --full "
                                                 "3,5,10,20,50).")] = None,
    partitions: Annotated[Optional[str], typer.Option(help="iid and/or dirichlet, comma-separated.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Dirichlet concentration.")] = None,
    privacy: Annotated[Optional[str], typer.Option(help="dp and/or none (NOT PRIVATE), comma-separated.")] = None,
    full: Full = False,
    dataset: Dataset = None, limit: Limit = None, image_size: ImageSize = None, channels: Channels = None,
    preset: Preset = None, rounds: Rounds = None, local_epochs: LocalEpochs = None, batch_size: BatchSize = None,
    lr: Lr = None, epsilon: Epsilon = None, cap_epsilon: CapEpsilon = None, feature_network: FeatureNetwork = None,
    classifier_epochs: ClassifierEpochs = None, num_samples: NumSamples = None, sample_steps: SampleSteps = None,
    seed: Seed = None, device: Device = None, parallel_sites: ParallelSites = None, cpus_per_site: CpusPerSite = None,
    out: Out = None, sets: Sets = None,
) -> None:
    """Quality (FID on a named network) and epsilon against the number of sites: the same data and compute split
    across 3 to 50 sites, IID and Dirichlet, with and without DP. Default: 3/5/10 sites, about 30 min on 2 cores."""
    from medfed.errors import ConfigError
    from medfed.studies import clients as study
    from medfed.studies.settings import with_given

    arms = words(privacy)
    if arms is not None and (not arms or set(arms) - {"dp", "none"}):
        raise ConfigError(f"--privacy '{privacy}': give dp, none or dp,none")
    options = with_given(
        (study.full_options if full else study.small_options)(data_path),
        config_options(dataset, limit, image_size, channels, preset, rounds, local_epochs, batch_size, lr, epsilon,
                       cap_epsilon, seed, device), sets,
        feature_network=feature_network, classifier_epochs=classifier_epochs, num_samples=num_samples,
        sample_steps=sample_steps, parallel_sites=parallel_sites, cpus_per_site=cpus_per_site,
        site_counts=numbers(sites, "--sites"), partitions=words(partitions), beta=beta,
        private=None if arms is None else tuple(a == "dp" for a in dict.fromkeys(arms)))
    finish(study.run_clients_study(options, out=out, command=command_line()))


@app.command()
def personalization(
    data_path: DataPath,
    sites: Annotated[Optional[int], typer.Option(help="Simulated sites (default 3; --full 5).")] = None,
    partition: Annotated[Optional[str], typer.Option(help="dirichlet (default) or iid.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Dirichlet concentration.")] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option(help="Local DP-SGD epochs of the personalization.")]
    = None,
    finetune_epsilon: Annotated[Optional[float], typer.Option(help="Epsilon each site plans the personalization "
                                                              "for (composed with the federated rounds in its "
                                                              "ledger).")] = None,
    full: Full = False,
    dataset: Dataset = None, limit: Limit = None, image_size: ImageSize = None, channels: Channels = None,
    preset: Preset = None, rounds: Rounds = None, local_epochs: LocalEpochs = None, batch_size: BatchSize = None,
    lr: Lr = None, epsilon: Epsilon = None, cap_epsilon: CapEpsilon = None, feature_network: FeatureNetwork = None,
    classifier_epochs: ClassifierEpochs = None, num_samples: NumSamples = None, sample_steps: SampleSteps = None,
    seed: Seed = None, device: Device = None, parallel_sites: ParallelSites = None, cpus_per_site: CpusPerSite = None,
    out: Out = None, sets: Sets = None,
) -> None:
    """Per-site scores of the global model, the global model fine-tuned at each site with DP charged to its own
    ledger, and a local-only model, on each site's own test images."""
    from medfed.studies import personalization as study
    from medfed.studies.settings import with_given

    options = with_given(
        (study.full_options if full else study.small_options)(data_path),
        config_options(dataset, limit, image_size, channels, preset, rounds, local_epochs, batch_size, lr, epsilon,
                       cap_epsilon, seed, device), sets,
        feature_network=feature_network, classifier_epochs=classifier_epochs, num_samples=num_samples,
        sample_steps=sample_steps, parallel_sites=parallel_sites, cpus_per_site=cpus_per_site,
        sites=sites, partition=partition, beta=beta, finetune_epochs=finetune_epochs,
        finetune_epsilon=finetune_epsilon)
    finish(study.run_personalization_study(options, out=out, command=command_line()))


@app.command()
def lightweight(
    data_path: DataPath,
    presets: Annotated[Optional[str], typer.Option(help="UNet presets, comma-separated (default micro,nano,pico; "
                                                   "--full adds tiny,small).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="DDIM step counts, comma-separated (default 50,20,10).")]
    = None,
    sites: Annotated[Optional[int], typer.Option(help="Simulated sites of each federated run.")] = None,
    edge_images: Annotated[Optional[int], typer.Option(help="Images sampled one at a time for the single-image "
                                                       "latency.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Sampling precision: auto, float32, bfloat16, "
                                                     "float16.")] = None,
    full: Full = False,
    dataset: Dataset = None, limit: Limit = None, image_size: ImageSize = None, channels: Channels = None,
    rounds: Rounds = None, local_epochs: LocalEpochs = None, batch_size: BatchSize = None, lr: Lr = None,
    epsilon: Epsilon = None, cap_epsilon: CapEpsilon = None, feature_network: FeatureNetwork = None,
    classifier_epochs: ClassifierEpochs = None, num_samples: NumSamples = None, seed: Seed = None,
    device: Device = None, parallel_sites: ParallelSites = None, cpus_per_site: CpusPerSite = None,
    out: Out = None, sets: Sets = None,
) -> None:
    """Presets smaller than tiny, fewer DDIM steps and a TorchScript export for edge sites: parameters, size on
    disk, peak memory, latency per image and FID for each."""
    from medfed.studies import lightweight as study
    from medfed.studies.settings import with_given

    options = with_given(
        (study.full_options if full else study.small_options)(data_path),
        config_options(dataset, limit, image_size, channels, None, rounds, local_epochs, batch_size, lr, epsilon,
                       cap_epsilon, seed, device), sets,
        feature_network=feature_network, classifier_epochs=classifier_epochs, num_samples=num_samples,
        parallel_sites=parallel_sites, cpus_per_site=cpus_per_site, presets=words(presets),
        step_counts=numbers(steps, "--steps"), sites=sites, edge_images=edge_images, precision=precision)
    finish(study.run_lightweight_study(options, out=out, command=command_line()))
