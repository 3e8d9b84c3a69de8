"""A study's settings and the run configs derived from them.

A study holds a base :class:`~medfed.config.RunConfig` (data, model, training, federation, privacy: everything a
federated run reads, built like every other command's config: the study's defaults, then the command-line options
by flag through :data:`medfed.config.OPTION_KEYS`, then ``--set``) and only the settings no run config has: the
feature network that scores it, how many samples with how many DDIM steps, Flower's simulation resources. Each
federated run's config is the base with typed fields replaced (:func:`run_config`, then each study's own changes);
no ``section.key`` string names a field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from medfed.config import DataConfig, RunConfig, build_config, to_flat, validate
from medfed.datasets import ImageDataset, load_dataset
from medfed.errors import ConfigError

CLASSIFIER = "classifier"


def study_base(data_path: str, *, limit: int = 600, preset: str = "micro", rounds: int = 2,
               lr: float = 1e-3) -> RunConfig:
    """The studies' base config: medfed's defaults with labelled ``npz`` images at ``data_path``, ``limit``
    training images over all sites (0 = all), ``preset`` UNet, ``rounds`` FedAvg rounds of one local epoch, batch
    32 at ``lr``; DDIM sampling, and one 16-image sample grid per run, after its last round. Privacy stays at
    medfed's defaults: each site plans epsilon 8 per run under a cap of 10."""
    d = RunConfig()
    return dataclasses.replace(
        d, data=dataclasses.replace(d.data, dataset="npz", path=data_path, limit=limit),
        model=dataclasses.replace(d.model, preset=preset),
        train=dataclasses.replace(d.train, batch_size=32, lr=lr, num_samples=16),
        federation=dataclasses.replace(d.federation, rounds=rounds, local_epochs=1, sample_every=0),
        diffusion=dataclasses.replace(d.diffusion, sampler="ddim"))


@dataclass(frozen=True)
class StudySetup:
    """Settings every study shares; each study's options hold one.

    Attributes:
        base: what every federated run of the study starts from (its :func:`run_config`): ``data`` (real,
            labelled images with ``train`` and ``test`` splits, e.g. a MedMNIST ``.npz``; ``data.limit`` training
            images over all sites, a seeded subset, 0 = all), ``model.preset``, ``federation.rounds`` and
            ``local-epochs``, ``train`` (batch size, lr, ``seed`` of runs, partitions, initial weights and
            sampling, ``device``), ``privacy.target-epsilon`` (what each site plans for over one federated run)
            and ``privacy.site-cap-epsilon`` (each simulated site's cap over everything its ledger records).
        feature_network: ``classifier`` (medfed's domain classifier, trained for the study on the train split of
            the same dataset and measured on its test split), ``fid-helper``, ``inception`` or a classifier file.
        classifier_epochs: training epochs of that classifier.
        num_samples: generated images behind every score.
        sample_steps: DDIM steps of every sample drawn for a score (and of each run's sample grid).
        parallel_sites, cpus_per_site: Flower simulation resources (Ray actors and their CPU threads).
    """

    base: RunConfig
    feature_network: str = CLASSIFIER
    classifier_epochs: int = 3
    num_samples: int = 256
    sample_steps: int = 20
    parallel_sites: int = 1
    cpus_per_site: int = 2


def check_setup(setup: StudySetup) -> None:
    """Range checks, naming the option, then the base config's own checks; the data and the feature network are
    checked when loaded."""
    cfg = setup.base
    cap, epsilon = min(cfg.privacy.site_caps), cfg.privacy.target_epsilon
    checks = [
        (cfg.data.limit >= 0, "--limit", "must be >= 0 (0 = all training images)"),
        (cfg.federation.rounds >= 1, "--rounds", "must be >= 1"),
        (cfg.federation.local_epochs >= 1, "--local-epochs", "must be >= 1"),
        (setup.num_samples >= 2, "--num-samples", "must be >= 2 (FID needs two images on each side)"),
        (setup.sample_steps >= 1, "--sample-steps", "must be >= 1"),
        (setup.classifier_epochs >= 1, "--classifier-epochs", "must be >= 1"),
        (cap >= epsilon, "--cap-epsilon", f"({cap:g}) must be at least --epsilon ({epsilon:g}), or every site refuses"),
        (setup.parallel_sites >= 1 and setup.cpus_per_site >= 1, "--parallel-sites/--cpus-per-site", "must be >= 1"),
    ]
    for ok, option, message in checks:
        if not ok:
            raise ConfigError(f"{option} {message}")
    validate(cfg)


# ------------------------------------------------------------------------------------------- the command line

def given_config(base: RunConfig, options: Mapping[str, object | None], sets: Iterable[str] | None = None) -> RunConfig:
    """``base`` with the command line laid over it: ``options`` by flag (``{"--lr": 1e-4}``; None = not given,
    :data:`medfed.config.OPTION_KEYS`), then ``--set`` items (:func:`medfed.config.build_config`).

    Raises:
        ConfigError: a bad value, naming the option or ``--set`` item it came from, and the key.
    """
    return build_config(options, sets, base=base)


Options = TypeVar("Options")


def with_given(options: Options, config_options: Mapping[str, object | None] | None = None,
               sets: Iterable[str] | None = None, **given: object) -> Options:
    """``options`` (a study's options, holding ``setup``) with what the command line gave: ``config_options`` (by
    flag) and ``sets`` laid over ``setup.base`` (:func:`given_config`), and each non-None ``given`` field replacing
    that of ``setup`` (a :class:`StudySetup` field) or of ``options``."""
    setup_fields = {f.name for f in dataclasses.fields(StudySetup)} - {"base"}
    values = {k: v for k, v in given.items() if v is not None}
    setup = dataclasses.replace(options.setup, base=given_config(options.setup.base, config_options or {}, sets),
                                **{k: v for k, v in values.items() if k in setup_fields})
    return dataclasses.replace(options, setup=setup, **{k: v for k, v in values.items() if k not in setup_fields})


# ------------------------------------------------------------------------------------------- study.json

def setup_record(setup: StudySetup) -> dict[str, Any]:
    """``study.json``'s ``options.setup``: the study's options by name (the fields its reports read), then the
    whole base config (``config``, flat keys)."""
    cfg = setup.base
    return {"data_path": cfg.data.path, "dataset": cfg.data.dataset, "limit": cfg.data.limit,
            "image_size": cfg.data.image_size, "channels": cfg.data.channels, "preset": cfg.model.preset,
            "rounds": cfg.federation.rounds, "local_epochs": cfg.federation.local_epochs,
            "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "target_epsilon": cfg.privacy.target_epsilon,
            "cap_epsilon": min(cfg.privacy.site_caps), "feature_network": setup.feature_network,
            "classifier_epochs": setup.classifier_epochs, "num_samples": setup.num_samples,
            "sample_steps": setup.sample_steps, "seed": cfg.train.seed, "device": cfg.train.device,
            "parallel_sites": setup.parallel_sites, "cpus_per_site": setup.cpus_per_site, "config": to_flat(cfg)}


def options_record(options: Any) -> dict[str, Any]:
    """``study.json``'s ``options``: :func:`setup_record`, then the study's own fields."""
    return {"setup": setup_record(options.setup),
            **{f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "setup"}}


# ------------------------------------------------------------------------------------------ data and configs

def absolute(path: str) -> str:
    """``path`` made absolute ("" stays ""): Flower runs the sites in other working folders."""
    return str(Path(path).expanduser().resolve()) if path else ""


def data_config(setup: StudySetup, split: str, limit: int = 0) -> DataConfig:
    """The base's data settings for ``split`` (``limit`` > 0: a seeded subset), with an absolute path."""
    data = setup.base.data
    return dataclasses.replace(data, path=absolute(data.path), split=split, limit=limit)


def load_split(setup: StudySetup, split: str, limit: int = 0) -> ImageDataset:
    """The study's images of ``split`` (``limit`` > 0: a seeded subset); they must carry class labels."""
    data = load_dataset(data_config(setup, split, limit), seed=setup.base.train.seed)
    if bool((data.labels < 0).any()):
        raise ConfigError(f"{setup.base.data.path}: the studies need class labels (Dirichlet splits and the domain "
                          f"classifier); {data.name} has images without one")
    return data


def run_config(setup: StudySetup, folder: Path, name: str, image_shape: tuple[int, int, int]) -> RunConfig:
    """The config of one federated run of the study: ``setup.base`` with an absolute data path, the loaded images'
    shape ``(C, H, W)``, ``setup.sample_steps`` DDIM steps, the run folder ``<folder>/runs/<name>`` and the
    simulated sites' ledgers in ``<folder>/site-state`` (or ``privacy.site-state-root`` when the base sets one).

    Each study then replaces its per-setting fields (sites, partition, privacy, ...) and calls
    :func:`medfed.config.validate` before its first run starts.
    """
    cfg = setup.base
    channels, size = image_shape[0], image_shape[1]
    state_root = cfg.privacy.site_state_root or str(folder / "site-state")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path), image_size=size, channels=channels),
        diffusion=dataclasses.replace(cfg.diffusion, sample_steps=setup.sample_steps),
        privacy=dataclasses.replace(cfg.privacy, site_state_root=state_root),
        output=dataclasses.replace(cfg.output, dir=str(folder / "runs"), name=name))
