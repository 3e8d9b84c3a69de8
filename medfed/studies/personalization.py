"""``medfed study personalization``: is the global model, a locally fine-tuned global model, or a model trained
at the site alone the best model for a site's own images?

The training images are split across sites (Dirichlet by default, so sites differ) and test images are dealt to
the same sites with each site's own class mix (:func:`deal_like`), so every site has test images from its own
distribution. Each site's images go into its own MedMNIST-layout ``.npz`` (``<study>/site-data/``), which the
federated run reads through ``data.site-paths``, as a deployment reads each hospital's folder. Then:

1. **global**: a real Flower run (DP-SGD and SecAgg+) trains the global model.
2. **personalized**: each site fine-tunes the global model on its own images for ``finetune_epochs`` with DP-SGD,
   through :func:`medfed.federation.site.train_site_privately`: the spend (planned for ``finetune_epsilon``) is
   committed to the site's own ledger, after the federated rounds, under the same cap; a site whose cap would be
   exceeded refuses, and the report says so.
3. **local-only**: each site trains a model from the same initial weights on its own images alone, with the same
   compute (``rounds`` x ``local_epochs`` epochs) and the same planned epsilon as the federated run. It is a
   counterfactual (had the site stayed out), so it is charged to a separate ledger (``<study>/local-only-state``).

Every model's samples are scored against the site's own test images on the study's feature network.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.checkpoint import Checkpoint, save_checkpoint
from medfed.config import RunConfig, to_flat, validate
from medfed.datasets import ImageDataset
from medfed.errors import ConfigError
from medfed.evaluation.features import FeatureSet
from medfed.federation.partition import partition
from medfed.federation.server import privacy_label
from medfed.federation.evaluation import site_test_data
from medfed.federation.policy import simulated_node
from medfed.federation.site import Site, load_site, train_site_privately
from medfed.generate import load_model
from medfed.privacy.budget import BudgetExceededError
from medfed.images import save_grid, to_uint8
from medfed.models import build_unet
from medfed.evaluation.scoring import Scorer
from medfed.studies.clients import PARTITIONS
from medfed.studies.common import (
    CpuMeter,
    announce,
    bar_plot,
    document,
    federated_run,
    fmt,
    ledger_record,
    md_table,
    network_line,
    open_study,
    prepare_scorer,
    sample_grid,
    sample_model,
    study_header,
    write_study,
)
from medfed.studies.settings import StudySetup, run_config, study_base

NAME = "personalization"
PLOT = "personalization.png"
MODELS = ("global", "personalized", "local-only")
MIN_TEST_IMAGES = 2  # FID needs two images on each side


@dataclass(frozen=True)
class PersonalizationOptions:
    """The personalization study.

    Attributes:
        setup: data, model, federated training, privacy and scoring settings.
        sites: simulated sites.
        partition, beta: how the training images are split (``dirichlet`` with ``beta``, or ``iid``).
        finetune_epochs: local DP-SGD epochs of the personalization.
        finetune_epsilon: the epsilon each site plans the personalization alone for (its ledger composes it with
            the federated rounds).
    """

    setup: StudySetup
    sites: int = 3
    partition: str = "dirichlet"
    beta: float = 0.5
    finetune_epochs: int = 2
    finetune_epsilon: float = 2.0


def small_options(data_path: str) -> PersonalizationOptions:
    """The default: 1,200 training images over 3 Dirichlet sites, micro UNet, 3 rounds, 2 fine-tuning epochs."""
    return PersonalizationOptions(StudySetup(study_base(data_path, limit=1200, rounds=3)))


def full_options(data_path: str) -> PersonalizationOptions:
    """``--full``, for a GPU machine: the whole train split over 5 sites, tiny UNet, 20 rounds, 5 fine-tuning
    epochs, 500 samples per model with 50 DDIM steps."""
    return PersonalizationOptions(StudySetup(study_base(data_path, limit=0, preset="tiny", rounds=20, lr=2e-4),
                                             num_samples=500, sample_steps=50, parallel_sites=4, cpus_per_site=4),
                                  sites=5, finetune_epochs=5)


def check_options(options: PersonalizationOptions) -> None:
    if options.sites < 3:
        raise ConfigError(f"--sites {options.sites}: must be >= 3 (secure aggregation over 2 sites would show each "
                          "site the other's update)")
    if options.partition not in PARTITIONS:
        raise ConfigError(f"--partition {options.partition}: choose from {', '.join(PARTITIONS)}")
    if options.beta <= 0:
        raise ConfigError(f"--beta {options.beta:g}: must be > 0")
    if options.finetune_epochs < 1:
        raise ConfigError(f"--finetune-epochs {options.finetune_epochs}: must be >= 1")
    if options.finetune_epsilon <= 0:
        raise ConfigError(f"--finetune-epsilon {options.finetune_epsilon:g}: must be > 0")
    if not options.setup.base.privacy.enabled:
        raise ConfigError("privacy.enabled=false: the personalization study charges DP fine-tuning to each site's "
                          "ledger and needs DP on")


def deal_like(test_labels: np.ndarray, site_train_labels: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Deal test images to sites in proportion to their training images, class by class, so that each site's test
    set has its training class mix.

    Site i gets ``floor(s * n_ic)`` test images of class c (seeded choice), where n_ic counts its training images
    of class c and s is the largest scale the test pool allows (``min over c of test_c / sum_i n_ic``). Test images
    beyond that, and of classes no site trained on, are left out.
    """
    classes = np.unique(np.concatenate(site_train_labels))
    counts = np.array([[np.sum(labels == c) for c in classes] for labels in site_train_labels])  # (sites, classes)
    pool = np.array([np.sum(test_labels == c) for c in classes])
    totals = counts.sum(0)
    scale = min(pool[k] / totals[k] for k in range(len(classes)) if totals[k] > 0)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in site_train_labels]
    for k, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(test_labels == c))
        take = np.floor(counts[:, k] * scale + 1e-9).astype(int)
        for site, part in enumerate(np.split(members[: take.sum()], np.cumsum(take)[:-1])):
            shards[site].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def site_pixels(data: ImageDataset) -> np.ndarray:
    """uint8 pixels in MedMNIST layout: (N, H, W) for gray, (N, H, W, C) for colour."""
    pixels = to_uint8(data.images).permute(0, 2, 3, 1).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def write_site_files(folder: Path, train: ImageDataset, test: ImageDataset, options: PersonalizationOptions,
                     seed: int) -> list[Path]:
    """Split the images across sites and write each site's ``train_*``/``test_*`` arrays to its own ``.npz``.

    Raises:
        ConfigError: a site would hold fewer than two test images (use fewer sites or a larger beta).
    """
    train_shards = partition(train.labels.numpy(), options.sites, options.partition, options.beta, seed=seed)
    test_shards = deal_like(test.labels.numpy(), [train.labels.numpy()[s] for s in train_shards], seed)
    for i, shard in enumerate(test_shards):
        if len(shard) < MIN_TEST_IMAGES:
            raise ConfigError(f"site {i} would hold {len(shard)} test image(s) of the {len(test)}; use fewer --sites "
                              "or a larger --beta")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (tr, te) in enumerate(zip(train_shards, test_shards)):
        site_train, site_test = train.subset(tr), test.subset(te)
        path = folder / f"site-{i}.npz"
        np.savez(path, train_images=site_pixels(site_train), train_labels=site_train.labels.numpy()[:, None],
                 test_images=site_pixels(site_test), test_labels=site_test.labels.numpy()[:, None])
        paths.append(path)
    return paths


def federated_config(cfg: RunConfig, options: PersonalizationOptions, files: list[Path]) -> RunConfig:
    """The study's run config ``cfg`` for its federated run: each site reads its own ``.npz`` of ``files``
    (``data.site-paths``, instead of a split of one dataset); checked."""
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path="", limit=0, site_paths=";".join(f"npz:{p}" for p in files)),
        federation=dataclasses.replace(cfg.federation, num_sites=options.sites, partition=options.partition,
                                       dirichlet_beta=options.beta))
    validate(cfg)
    return cfg


def stage_config(cfg: RunConfig, suffix: str, local_epochs: int, target_epsilon: float) -> RunConfig:
    """``cfg`` for one local DP-SGD stage at a site: one "round" of ``local_epochs``, planned for
    ``target_epsilon``, recorded in ledgers under the run name ``<run>-<suffix>``."""
    return dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, rounds=1, local_epochs=local_epochs),
        privacy=dataclasses.replace(cfg.privacy, target_epsilon=target_epsilon),
        output=dataclasses.replace(cfg.output, name=f"{cfg.output.name}-{suffix}"))


def run_personalization_study(options: PersonalizationOptions, out: str | Path | None = None, command: str = "",
                              show_progress: bool = True) -> Path:
    """Federated run, then per site: personalize (DP, own ledger), train local-only, score all three; returns the
    study folder (``study.json``, ``report.md``, ``personalization.png``, ``grids/``, ``models/``)."""
    setup = options.setup
    check_options(options)
    train, test, device, folder = open_study(NAME, setup, out)
    files = write_site_files(folder / "site-data", train, test, options, setup.base.train.seed)
    cfg = federated_config(run_config(setup, folder, "federated", train.image_shape), options, files)
    payload = study_header(NAME, options, command)
    payload.update({"site_files": [str(p) for p in files], "sites": []})
    start = time.perf_counter()
    with CpuMeter(folder) as meter:
        scorer = prepare_scorer(setup, folder, device, show_progress)
        payload["feature_network"] = scorer.record
        announce(f"federated run: {options.sites} sites, {len(train)} training images")
        t0 = time.perf_counter()
        run, used = federated_run(cfg, setup, show_progress)
        global_model, ckpt = load_model(run.latest_checkpoint, device)
        shape = tuple(ckpt.image_shape)
        announce(f"sampling the global model ({setup.num_samples} images)")
        global_images = sample_model(global_model, used, setup, shape, device, show_progress)
        payload.update({"run": str(run.root), "sample_grid": sample_grid(run), "config": to_flat(used),
                        "privacy": privacy_label(used), "federated_wall_s": time.perf_counter() - t0})
        grids = folder / "grids"
        save_grid(global_images[:16], grids / "global.png")
        for i in range(options.sites):
            node = simulated_node(used, i, options.sites)
            site = load_site(used, node)
            site_test, reference = site_test_data(used, node, site.data)
            if reference != "test split":
                raise ConfigError(f"{files[i]}: the site's test split could not be read")
            t1 = time.perf_counter()
            real = scorer.features(site_test.images, f"{site.name} test split ({len(site_test)} images)")
            after_federation = ledger_record(site.state_dir, used.privacy.delta, used.privacy.accountant)
            models: dict[str, dict[str, Any]] = {"global": {"scores": scorer.score(real, global_images),
                                                            "ledger": after_federation}}

            announce(f"{site.name}: personalizing the global model ({options.finetune_epochs} DP epochs, "
                     f"planned epsilon {options.finetune_epsilon:g}, charged to the site's ledger)")
            tuned = copy.deepcopy(global_model)
            tune_cfg = stage_config(used, "personalization", options.finetune_epochs, options.finetune_epsilon)
            try:
                training = train_at_site(tuned, tune_cfg, site, used.federation.rounds + 1, device)
                models["personalized"] = trained_model("personalized", tuned, tune_cfg, site, training, shape,
                                                       setup, device, scorer, real, folder, show_progress)
            except BudgetExceededError as err:
                models["personalized"] = {"refused": str(err),
                                          "ledger": ledger_record(site.state_dir, used.privacy.delta,
                                                                  used.privacy.accountant)}

            epochs = used.federation.rounds * used.federation.local_epochs
            announce(f"{site.name}: local-only model ({epochs} DP epochs on its own images, counterfactual ledger)")
            torch.manual_seed(used.train.seed)  # the federated run's initial weights
            alone = build_unet(used.model.preset, shape[0], used.model.num_classes).to(device)
            alone_cfg = stage_config(used, "local-only", epochs, used.privacy.target_epsilon)
            alone_site = dataclasses.replace(site, state_dir=folder / "local-only-state" / site.name)
            training = train_at_site(alone, alone_cfg, alone_site, 1, device)
            models["local-only"] = trained_model("local-only", alone, alone_cfg, alone_site, training, shape,
                                                 setup, device, scorer, real, folder, show_progress)
            for model_name in ("personalized", "local-only"):
                if "images" in models[model_name]:
                    save_grid(models[model_name].pop("images")[:16], grids / f"{site.name}-{model_name}.png")
            payload["sites"].append({
                "site": site.name, "train_images": len(site.data), "test_images": len(site_test),
                "train_class_mix": class_mix(site.data.labels), "test_class_mix": class_mix(site_test.labels),
                "feature_network": scorer.name, "models": models, "wall_s": time.perf_counter() - t1})
            write_study(folder, payload, markdown, start, meter)
            plot(payload, folder / PLOT)
        payload["complete"] = True
    write_study(folder, payload, markdown, start, meter)
    return folder


def train_at_site(model: torch.nn.Module, cfg: RunConfig, site: Site, server_round: int,
                  device: torch.device) -> dict[str, Any]:
    """:func:`train_site_privately` (plan, commit to the site's ledger, DP-SGD), without Opacus' "Secure RNG
    turned off" warning: medfed's noise comes from OS-entropy generators (see :mod:`medfed.privacy.dp_sgd`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        reply = train_site_privately(model, cfg, site, server_round, 0, device)
    return {k: v for k, v in dataclasses.asdict(reply).items() if v is not None}


def trained_model(name: str, model: torch.nn.Module, cfg: RunConfig, site: Site, training: dict[str, Any],
                  shape: tuple[int, int, int], setup: StudySetup, device: torch.device, scorer: Scorer,
                  real: FeatureSet, folder: Path, show_progress: bool) -> dict[str, Any]:
    """Save a site's locally trained model ``name`` (``models/<site>-<name>.pt``), sample and score it, and read
    the ledger the training was charged to. The samples are returned under ``images`` (not written to JSON)."""
    path = save_checkpoint(Checkpoint(model=model.state_dict(), config=cfg, image_shape=shape, step=1,
                                      extra={"kind": name, "site": site.name, "privacy": privacy_label(cfg)}),
                           folder / "models" / f"{site.name}-{name}.pt")
    images = sample_model(model, cfg, setup, shape, device, show_progress)
    return {"scores": scorer.score(real, images), "images": images, "checkpoint": str(path),
            "training": {k: v for k, v in training.items() if isinstance(v, (int, float, str, bool))},
            "ledger": ledger_record(site.state_dir, cfg.privacy.delta, cfg.privacy.accountant)}


def class_mix(labels: torch.Tensor) -> dict[str, float]:
    """Share of each class label among ``labels``."""
    values, counts = np.unique(labels.numpy(), return_counts=True)
    return {str(int(v)): float(c / counts.sum()) for v, c in zip(values, counts)}


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Each model's FID and KID at each site, as grouped bars (a refused personalization has no bar)."""
    sites = payload["sites"]
    panels = []
    for metric, label in (("fid", "FID"), ("kid", "KID")):
        series = {model: [s["models"][model]["scores"][metric] if "scores" in s["models"][model] else float("nan")
                          for s in sites] for model in MODELS}
        panels.append((f"{label} on each site's own test images", f"{label} (lower is better)",
                       [s["site"] for s in sites], series))
    return bar_plot(panels, path)


def markdown(payload: dict[str, Any]) -> str:
    options, setup = payload["options"], payload["options"]["setup"]
    sites = payload["sites"]

    def score(s: dict[str, Any], model: str, metric: str, decimals: int) -> str:
        m = s["models"][model]
        return "refused (cap)" if "refused" in m else fmt(m["scores"][metric], decimals)

    def eps(s: dict[str, Any], model: str) -> str:
        return fmt(s["models"][model]["ledger"]["epsilon"], 2)

    header = ["site", "train / test images", "class mix (train)", "class mix (test)", "FID global", "FID personalized",
              "FID local-only", "KID global", "KID personalized", "KID local-only", "epsilon after FL",
              "epsilon after personalization", "epsilon local-only"]
    rows = [[s["site"], f"{s['train_images']} / {s['test_images']}",
             *[" / ".join(f"{k}: {v:.0%}" for k, v in s[mix].items()) for mix in ("train_class_mix", "test_class_mix")],
             *[score(s, m, "fid", 1) for m in MODELS], *[score(s, m, "kid", 3) for m in MODELS],
             eps(s, "global"), eps(s, "personalized"), eps(s, "local-only")] for s in sites]
    lines = [
        "# Study: personalization", "",
        f"{options['sites']} sites ({options['partition']}"
        f"{', beta ' + format(options['beta'], 'g') if options['partition'] == 'dirichlet' else ''}) share "
        f"{setup['limit'] or 'all'} training images; each site's test images follow its own class mix. "
        f"`{setup['preset']}` UNet, batch {setup['batch_size']}, lr {setup['lr']:g}.", "",
        f"- **global**: real Flower run, {setup['rounds']} rounds x {setup['local_epochs']} local epoch(s), DP-SGD "
        f"(each site planned epsilon {setup['target_epsilon']:g}) and SecAgg+.",
        f"- **personalized**: the global model fine-tuned at the site for {options['finetune_epochs']} DP-SGD "
        f"epochs (planned epsilon {options['finetune_epsilon']:g}), committed to the site's own ledger after the "
        f"federated rounds, under its cap {setup['cap_epsilon']:g}.",
        f"- **local-only**: trained at the site alone from the same initial weights, "
        f"{setup['rounds'] * setup['local_epochs']} DP-SGD epochs planned for epsilon {setup['target_epsilon']:g}"
        " (the federated run's compute and budget), charged to a separate counterfactual ledger.", "",
        f"Scores: {setup['num_samples']} samples per model (DDIM, {setup['sample_steps']} steps, seed "
        f"{setup['seed']}) against the site's own test images. {network_line(payload['feature_network'])}", "",
        md_table(header, rows), "",
        f"![FID and KID per site]({PLOT})", "",
        "- epsilon: what the site's verified ledger records at delta "
        f"{sites[0]['models']['global']['ledger']['delta'] if sites else ''} after each stage (RDP composition "
        "of all its entries, so the personalized model's epsilon includes the federated rounds).",
        "- FID from a few hundred samples against a site's test images is biased upward (more so for small "
        "sites); compare the three models within a row.",
    ]
    return document(lines, payload, f"{len(sites)} sites")
