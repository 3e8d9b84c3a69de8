#!/usr/bin/env bash
# Quality benchmark on one GPU (prepared for one H100; the whole script within about 8 minutes).
#
#   1. Fashion-MNIST, the paper's setting scaled to fit: FedAvg over 10 sites, Dirichlet(0.5) label split,
#      non-private (bench_quality.py arm 2, budget "gpu": tiny UNet, 60,000 images, 10 rounds of 1 local epoch).
#      Tun et al. report FID 17.03 for this setting with their non-standard FID ([-1, 1] inputs, normalize=True):
#      our number is the standard offline Inception FID (fid-helper), so put it beside theirs, not against it.
#   2. MNIST at DP epsilon 10 (arm 3: DP-SGD over all private images at one site, epsilon from its ledger), the
#      DPDM anchor: TSTR 97.7-98.1%, FID 4.4 (DPImageBench).
# Each arm: 10,000 class-balanced samples (DDIM 25 steps, no guidance), TSTR with the fixed CNN of
# medfed.evaluation.utility, FID/KID on the domain classifier and the offline Inception (fid-helper) against
# 10,000 real test images. Results: benchmarks/results/quality-gpu.json (a rerun skips measured arms; --force).
#
# Needs the project's environment (make venv) and the shared data (MEDFED_SHARED_DATA or ../shared/data).
# Usage: benchmarks/gpu_quality.sh [extra bench_quality.py options, e.g. --force]
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PY="${PYTHON:-.venv/bin/python}"
OUT_DIR="${OUT_DIR:-${TMPDIR:-/tmp}/medfed-quality-gpu}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_quality.sh: no CUDA device visible to $PY; run bench_quality.py --budget cpu instead" >&2
    exit 2
fi
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0))'

common=(--budget gpu --device cuda --results-name quality-gpu --out-dir "$OUT_DIR")
start=$SECONDS
# Each step has its own time limit so that one slow step cannot take the whole slot; results so far are kept.
timeout 270 "$PY" benchmarks/bench_quality.py "${common[@]}" --dataset fashion-mnist --arm 2 --sites 10 "$@"
timeout 200 "$PY" benchmarks/bench_quality.py "${common[@]}" --dataset mnist --arm 3 "$@"
echo "gpu_quality.sh: done in $((SECONDS - start)) s"

"$PY" - <<'EOF'
import json
from pathlib import Path

results = json.loads(Path("benchmarks/results/quality-gpu.json").read_text())
for name, entry in results["datasets"].items():
    base = entry["real_baseline"]
    for arm, r in entry["arms"].items():
        fids = ", ".join(f"FID {s['fid']:.2f} ({net})" for net, s in r["feature_scores"].items() if "fid" in s)
        eps = "not private" if r["epsilon"] is None else f"epsilon {r['epsilon']:.2f}"
        print(f"{name} arm {arm} ({eps}): TSTR accuracy {r['tstr']['accuracy']:.4f} (real {base['accuracy']:.4f}); "
              f"{fids}; train {r['train_wall_s']:.0f} s")
EOF
