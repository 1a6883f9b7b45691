#!/usr/bin/env bash
# Scaling of distributed training on this machine, side by side in one run:
#   A  1 rank,  1 thread,  batch B
#   B  2 ranks, 1 thread each, batch B per rank (global 2B)
#   C  1 rank,  2 threads, batch 2B
# on Fashion-MNIST with the demo's model (examples/fashion-mnist.yaml), each
# run by the real momentum-worker for a fixed number of steps. Reports
#   scaling efficiency = img/s(B) / (2 * img/s(A))      (target >= 0.9)
#   ranks vs threads   = img/s(B) / img/s(C)
# and where B's step time goes (data, forward, backward, communication,
# optimizer), from the worker's metrics. The first logging window of every
# run (start-up, allocator warm-up) is left out; the runs are repeated
# --repeats times in turn and averaged.
#   bench/scaling.sh [--batch B] [--steps N] [--repeats R]
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=128 steps=60 repeats=2
while [ $# -gt 0 ]; do
  case $1 in
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "bench/scaling.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
source scripts/setup.sh
momentum_install_packages
momentum_python_env
momentum_build momentum-worker
worker=${MOMENTUM_BUILD_DIR:-build}/worker/momentum-worker
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
every=$((steps / 6))
run() {  # name nproc threads global_batch repeat
  local dir=$out/$1-$5
  "$worker" --nproc "$2" --config examples/fashion-mnist.yaml \
    --set output_dir="$dir" --set resources.threads="$3" \
    --set optim.batch_size="$4" --set optim.time_budget_s=0 \
    --set optim.steps="$steps" --set logging.every_steps="$every" \
    --set eval.every_epochs=0 --set eval.max_train=2000 \
    --set eval.max_test=500 --set checkpoint.every_epochs=0 \
    --set moco.bn=shuffle > "$dir.log" 2>&1 ||
    { echo "bench/scaling.sh: run $1 failed:"; tail -5 "$dir.log"; exit 1; } >&2
}
for r in $(seq "$repeats"); do
  run A 1 1 "$batch" "$r"
  run B 2 1 $((2 * batch)) "$r"
  run C 1 2 $((2 * batch)) "$r"
done
/usr/bin/python3 - "$out" "$repeats" "$batch" <<'PY'
import json, os, sys
out, repeats, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
phases = ("data", "forward", "backward", "communication", "optimizer")

def windows(name, r):
    rows = [json.loads(l) for l in open(os.path.join(out, f"{name}-{r}", "metrics.jsonl"))]
    return [w for w in rows if "images_per_s" in w][1:]

res = {}
for name in "ABC":
    ws = [w for r in range(1, repeats + 1) for w in windows(name, r)]
    res[name] = {
        "images_per_s": sum(w["images_per_s"] for w in ws) / len(ws),
        "step_ms": {p: sum(w["step_ms"][p] for w in ws) / len(ws) for p in phases},
    }
labels = {"A": f"1 rank x 1 thread, batch {batch}",
          "B": f"2 ranks x 1 thread, batch {batch} per rank",
          "C": f"1 rank x 2 threads, batch {2 * batch}"}
print(f"{'run':<44} {'img/s':>8}  step ms: " + " ".join(f"{p:>13}" for p in phases))
for name in "ABC":
    r = res[name]
    print(f"{name} {labels[name]:<42} {r['images_per_s']:>8.1f}           "
          + " ".join(f"{r['step_ms'][p]:>13.1f}" for p in phases))
b = res["B"]["step_ms"]
share = b["communication"] / sum(b.values())
eff = res["B"]["images_per_s"] / (2 * res["A"]["images_per_s"])
switch = res["B"]["images_per_s"] / res["C"]["images_per_s"]
print(f"scaling efficiency B / 2A = {eff:.3f} (target >= 0.9)")
print(f"2 ranks vs 2 threads B / C = {switch:.2f}x")
print(f"communication share of B's step = {100 * share:.1f}%")
print(json.dumps({"scaling_efficiency": eff, "ranks_vs_threads": switch,
                  "communication_share": share, "runs": res}))
PY
