"""`medfed privacy audit` on a DP model (epsilon 8) and a non-private one trained on the same small shard.

The shard: the first ``2 x --images`` MNIST training digits from the shared data, halved at random into members
and held-out images (one pool, as one-run audits assume). The non-private model is medfed's centralized trainer (no EMA, so the audit
sees the trained weights) for ``--steps`` steps; the DP model is the site's DP-SGD path
(``medfed.privacy.dp_sgd.train_private``, Opacus, Poisson sampling) planned for epsilon 8 at delta 1e-5 over
``--epochs`` epochs at batch ``--batch-size``. Both are audited with the same options (loss-threshold and PIA
attacks, timesteps 50/100/200, 4 draws); the DP model's proven epsilon is its accountant's.

CPU by default and small on purpose (a few minutes on a shared 2-core machine); at 64 images per side the
empirical lower bound cannot exceed about 1.9, whatever the attack: the bound is honest, and loose at small N.

Usage: python benchmarks/bench_audit.py [--quick] [--images 64] [--size 16] [--steps 1200] [--epochs 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from medfed.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from medfed.config import from_flat  # noqa: E402
from medfed.datasets import load_dataset  # noqa: E402
from medfed.devices import resolve_device  # noqa: E402
from medfed.diffusion import make_scheduler  # noqa: E402
from medfed.generate import load_model  # noqa: E402
from medfed.models import build_unet  # noqa: E402
from medfed.privacy.accounting import epsilon, plan_noise  # noqa: E402
from medfed.privacy.audit import AuditOptions, ProvenEpsilon, audit_model, table, to_json  # noqa: E402
from medfed.privacy.dp_sgd import train_private  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
DELTA = 1e-5


def shard(folder: Path, images: int) -> Path:
    """An archive whose ``train`` split (members) and ``test`` split (held-out) are a seeded random halving of the
    first ``2 x images`` MNIST training digits: one pool, so only membership tells the two sides apart."""
    mnist = np.load(SHARED_DATA / "mnist" / "mnist.npz")
    order = np.random.default_rng(0).permutation(2 * images)
    digits, labels = mnist["train_images"][order], mnist["train_labels"][order]
    path = folder / f"mnist-{images}.npz"
    np.savez(path, train_images=digits[:images], train_labels=labels[:images], test_images=digits[images:],
             test_labels=labels[images:])
    return path


def main() -> None:
    from medfed.centralized import train_centralized

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="members (and held-out images)")
    parser.add_argument("--size", type=int, default=16, help="image side the digits are resized to")
    parser.add_argument("--preset", default="pico")
    parser.add_argument("--steps", type=int, default=1200, help="non-private training steps (full batches)")
    parser.add_argument("--epochs", type=int, default=40, help="DP-SGD epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="DP-SGD expected Poisson batch")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="16 images, 200 steps, 10 epochs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps, args.epochs = 16, 200, 10
    device = resolve_device(args.device)
    options = AuditOptions(delta=DELTA)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        folder = Path(tmp)
        data_path = str(shard(folder, args.images))
        cfg = from_flat({"model.preset": args.preset, "data.dataset": "npz", "data.path": data_path,
                         "data.image-size": args.size, "data.channels": 1, "train.batch-size": args.images,
                         "train.steps": args.steps, "train.lr": args.lr, "train.ema-decay": 0.0,
                         "train.num-samples": 4, "diffusion.sample-steps": 4, "train.checkpoint-every": 10**6,
                         "train.sample-every": 10**6, "train.log-every": 100, "train.device": args.device,
                         "output.dir": str(folder), "output.name": "non-private"})
        members = load_dataset(cfg.data)
        held_out = load_dataset(dataclasses.replace(cfg.data, split="test"))
        scheduler = make_scheduler(cfg.diffusion)
        rows = {}

        start = time.perf_counter()
        trained = train_centralized(cfg, show_progress=False)
        model, _ = load_model(trained.run.latest_checkpoint, device)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = audit_model(model, scheduler, members, held_out, options, device,
                             ProvenEpsilon(None, None, "not private: no accountant"))
        rows["non-private"] = {**to_json(result), "train_s": train_s, "audit_s": time.perf_counter() - start,
                               "final_loss": trained.last_loss}
        print(table(result), flush=True)

        start = time.perf_counter()
        plan = plan_noise(len(members), args.batch_size, args.epochs, 1, target_epsilon=8.0, delta=DELTA,
                          accountant="rdp")
        torch.manual_seed(0)
        dp_model = build_unet(args.preset, 1).to(device)
        done = train_private(dp_model, members, plan, batch_size=args.batch_size, lr=args.lr,
                             local_epochs=args.epochs, max_grad_norm=1.0, noise_multiplicity=1, engine="layers",
                             scheduler=scheduler, device=device)
        train_s = time.perf_counter() - start
        proven = epsilon([(done.noise_multiplier, done.sample_rate, done.steps)], DELTA, "rdp")
        save_checkpoint(Checkpoint(model=dp_model.state_dict(), config=cfg, image_shape=members.image_shape,
                                   step=done.steps), folder / "dp.pt")
        dp_model, _ = load_model(folder / "dp.pt", device)
        start = time.perf_counter()
        result = audit_model(dp_model, scheduler, members, held_out, options, device,
                             ProvenEpsilon(proven, DELTA, "Opacus RDP accountant of the DP-SGD run"))
        rows["dp-epsilon-8"] = {**to_json(result), "train_s": train_s, "audit_s": time.perf_counter() - start,
                                "noise_multiplier": done.noise_multiplier, "sample_rate": done.sample_rate,
                                "steps": done.steps, "final_loss": float(np.mean(done.losses[-10:]))}
        print(table(result), flush=True)

    summary = [{"model": name, **{a["attack"] + "_auc": a["auc"] for a in r["attacks"]},
                **{a["attack"] + "_tpr_at_1pct_fpr": a["tpr_at_fpr"]["0.01"] for a in r["attacks"]},
                "epsilon_lower_bound": r["epsilon_lower_bound"], "proven_epsilon": r["proven_epsilon"]["epsilon"]}
               for name, r in rows.items()]
    write_results("audit", {"options": vars(args), "summary": summary, "models": rows})


if __name__ == "__main__":
    main()
