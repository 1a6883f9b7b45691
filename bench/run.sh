#!/usr/bin/env bash
# Side-by-side throughput: the C++ trainer step (bench/trainer_bench) against
# the Python reference (bench/reference_bench.py) on the same model, batch and
# thread count, with synthetic inputs and with the real augmentation
# pipeline, in one run. Prints each measurement as JSON and the ratios.
#   bench/run.sh [--threads N] [--steps N] [--batch N] [--width N]
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 steps=15 batch=256 width=16
while [ $# -gt 0 ]; do
  case $1 in
    --threads) threads=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    *) echo "bench/run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
source scripts/setup.sh
momentum_install_packages
momentum_python_env
momentum_build trainer_bench
python=${MOMENTUM_VENV:-.venv}/bin/python
build=${MOMENTUM_BUILD_DIR:-build}
common=(--arch resnet18 --width "$width" --in-channels 1 --small-stem --mlp
        --image-size 28 --batch "$batch" --queue 4096 --dim 128
        --threads "$threads" --steps "$steps" --warmup 3)
out=$(mktemp -d)
for mode in synthetic augment; do
  # One loader thread/process in both, as the official code's default of
  # one DataLoader worker per GPU process.
  "$build/bench/trainer_bench" "${common[@]}" --mode "$mode" --workers 1 | tee "$out/cpp-$mode.json"
  "$python" bench/reference_bench.py "${common[@]}" --mode "$mode" --workers 1 | tee "$out/py-$mode.json"
done
/usr/bin/python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
print(f"{'mode':<10} {'C++ img/s':>10} {'Python img/s':>13} {'ratio':>6}")
for mode in ("synthetic", "augment"):
    c = json.load(open(os.path.join(d, f"cpp-{mode}.json")))
    p = json.load(open(os.path.join(d, f"py-{mode}.json")))
    print(f"{mode:<10} {c['images_per_s']:>10.1f} {p['images_per_s']:>13.1f} "
          f"{c['images_per_s'] / p['images_per_s']:>5.2f}x")
PY
rm -rf "$out"
