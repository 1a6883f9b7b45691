#!/usr/bin/env bash
# The whole training job, side by side on this machine's CPUs, in one run:
#   ours      momentum-worker --nproc N (Gloo, shuffled BN, its loader threads)
#   official  bench/official_job.py --nproc N: the official MoCo v2 code
#             (main_moco.py + builder.py semantics: DDP, shuffled BN, a
#             DataLoader with a DistributedSampler and --workers processes per
#             rank, torchvision transforms on PIL images)
# on the same job spec (default examples/fashion-mnist.yaml: ResNet-18 of
# width 16, 1 channel, small stem, MLP head; Fashion-MNIST), with the same
# ranks, threads per rank and loader workers per rank (our loader threads,
# the official DataLoader processes). Before running, both sides' resolved
# specs are compared field by field (model, moco, data.augment, optim, eval),
# so that both do the same work.
#
#   bench/job_bench.sh [--mode real|synthetic] [--nproc N] [--threads T]
#                      [--workers W] [--width W] [--steps S] [--warmup W]
#                      [--config FILE] [--set FIELD=VALUE]... [--repeats R]
#                      [--precision fp32|bf16] [--out DIR]
#   bench/job_bench.sh --time-to-accuracy TARGET --budget SECONDS
#                      [--eval-every-epochs E] [...]
#
# Throughput (default, --mode real): both train warm-up + S steps (optim.steps,
# the worker's schedule on both); the warm-up steps are left out. Prints
# images/s (global), the step time per phase and the ratio ours / official.
# --repeats R runs both R times, taking turns, and pools the timed steps (a
# shared machine's load then falls on both; the per-run images/s are printed).
# Phases: data, forward, backward, communication, optimizer (our
# metrics.jsonl step_ms fields; official_job.py's other = its meters, the
# learning rate, the loop). Attribution differs in two places, so the table
# also shows backward + communication: DDP's gradient all-reduce overlaps the
# official backward and is counted there, ours runs after backward and is
# counted as communication; the key encoder's momentum update is in the
# official forward and in our optimizer phase. Our images/s are those of the
# worker's metrics windows (the steps' own time); the official's are its
# steps' time likewise.
#
# --mode synthetic: random inputs made once, the step alone. momentum-worker
# has no synthetic input, so this row is ONE process on both sides:
# bench/trainer_bench --mode synthetic (our trainer step: the worker's Moco
# and Sgd, no process group) against official_job.py --nproc 1 --mode
# synthetic (DDP in a group of one), global batch, --threads threads, BN
# shuffled in one group on both. trainer_bench reports no phase split.
#
# --time-to-accuracy TARGET --budget S: both train for S seconds of training
# time (optim.time_budget_s; evaluation not counted), with the kNN monitor
# (worker/knn.cc's protocol on both: k 200, exp(sim / 0.1), the un-augmented
# train set as the bank) every E epochs (default 1; the worker evaluates at
# epoch ends only, so both use the same cadence) and at the end; prints the
# kNN curve of each and the first training time at which top-1 >= TARGET.
#
# --precision bf16: ours with resources.precision bf16 (convolutions and
# matrix products autocast to bfloat16); the official side stays float32, as
# the official code has no such option and its users run it so.
#
# --set FIELD=VALUE (repeatable) applies to both sides (e.g.
# --set eval.max_train=10000 for a shorter kNN). Every output goes under
# --out DIR (default a temporary folder, removed at the end).
# MOMENTUM_NO_BUILD=1 skips the build and uses the binaries already in
# ${MOMENTUM_BUILD_DIR:-build} (e.g. a build shared with another checkout).
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=real nproc=2 threads=1 workers=1 width=16 steps=40 warmup=10
precision=fp32 config=examples/fashion-mnist.yaml target="" budget=600 eval_every=1 out="" repeats=1
sets=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --mode) mode=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --time-to-accuracy) target=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --eval-every-epochs) eval_every=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/job_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $precision in
  fp32|bf16) ;;
  *) echo "bench/job_bench.sh: --precision must be fp32 or bf16, got $precision" >&2; exit 2 ;;
esac
case $mode in
  real|synthetic) ;;
  *) echo "bench/job_bench.sh: --mode real or synthetic" >&2; exit 2 ;;
esac
if [ -n "$target" ] && [ "$mode" != real ]; then
  echo "bench/job_bench.sh: --time-to-accuracy trains on the real data (--mode real)" >&2; exit 2
fi
[ -n "$target" ] && repeats=1  # one long run each
source scripts/setup.sh
momentum_install_packages
momentum_python_env
if [ -z "${MOMENTUM_NO_BUILD:-}" ]; then
  momentum_build momentum-worker trainer_bench
fi
build=${MOMENTUM_BUILD_DIR:-build}
worker=$build/worker/momentum-worker
trainer_bench=$build/bench/trainer_bench
python=${MOMENTUM_VENV:-.venv}/bin/python
if [ -z "$out" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
else
  mkdir -p "$out"
fi

echo "== $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs" \
  "(cores per socket: $(lscpu | sed -n 's/^Core(s) per socket: *//p' | head -1)," \
  "threads per core: $(lscpu | sed -n 's/^Thread(s) per core: *//p' | head -1))"
if [ "$mode" = synthetic ]; then
  shape="1 process, $threads threads"
else
  shape="$nproc ranks, $threads threads and $workers loader workers per rank"
fi
echo "== torch $("$python" -c 'import torch; print(torch.__version__)'), spec $config," \
  "mode ${target:+time-to-accuracy, }$mode, $shape, ours in $precision, official in fp32"

# The fields both sides read, the same on both (--set applies to both).
common=(--set model.width="$width")
# Throughput: the worker evaluates once at the end (untimed); a small kNN.
[ -z "$target" ] && common+=(--set eval.max_train=2000 --set eval.max_test=500)
for s in ${sets[@]+"${sets[@]}"}; do common+=(--set "$s"); done
if [ -n "$target" ]; then
  # Time to accuracy: a time bound, kNN every E epochs.
  ours_run=(--set optim.time_budget_s="$budget" --set optim.epochs=0 --set optim.steps=0
            --set eval.every_epochs="$eval_every")
  official_run=(--time-budget "$budget" --eval-every-epochs "$eval_every" --target "$target")
else
  # Throughput: warm-up + S steps, logged every warm-up steps so that the
  # first window (left out) is the warm-up; S is rounded up to a multiple.
  every=$((warmup > 0 ? warmup : steps))
  steps=$(((steps + every - 1) / every * every))
  # The schedule over so few steps can collapse the features (e.g. width 64,
  # 13 steps); the official code has no collapse check, so ours is off too.
  ours_run=(--set optim.time_budget_s=0 --set optim.epochs=0 --set optim.steps=$((warmup + steps))
            --set eval.every_epochs=0 --set faults.collapse_std_ratio=0)
  official_run=(--steps "$steps" --warmup "$warmup")
  common+=(--set logging.every_steps="$every")
fi
ours_bn=()
# One rank: the official shuffle is of one group (builder.py has no split BN).
[ "$nproc" = 1 ] && ours_bn=(--set moco.bn=split --set moco.bn_groups=1)

# Both sides' resolved specs must agree on every field that sets the work.
"$worker" --config "$config" "${common[@]}" "${ours_run[@]}" --print-spec > "$out/ours-spec.yaml"
"$python" bench/official_job.py --config "$config" "${common[@]}" "${official_run[@]}" \
  --nproc "$nproc" --print-spec > "$out/official-spec.json"
"$python" - "$out/ours-spec.yaml" "$out/official-spec.json" <<'PY'
import json, sys, yaml
ours = yaml.safe_load(open(sys.argv[1]))
official = json.load(open(sys.argv[2]))
if ours["data"]["image_size"] == 0:
    ours["data"]["image_size"] = 28  # Fashion-MNIST's, as both resolve it
fields = [("seed",), ("model",), ("data", "path"), ("data", "limit"), ("data", "image_size"),
          ("data", "augment"), ("optim",), ("logging",)]
fields += [("moco", k) for k in ("dim", "queue_size", "momentum", "temperature", "mlp")]
fields += [("eval", k) for k in ("knn_k", "knn_temperature", "max_train", "max_test")]
bad = []
for path in fields:
    a, b = ours, official
    for key in path:
        a, b = a[key], b[key]
    if a != b:
        bad.append(f"{'.'.join(path)}: ours {a!r}, official {b!r}")
for b in bad:
    print("bench/job_bench.sh: the two sides' specs differ: " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY

run_ours() {  # repeat: the worker, real data
  "$worker" --nproc "$nproc" --config "$config" "${common[@]}" "${ours_run[@]}" \
    ${ours_bn[@]+"${ours_bn[@]}"} --set output_dir="$out/ours-$1" \
    --set resources.threads="$threads" --set data.loader_threads="$workers" \
    --set resources.precision="$precision" \
    --set checkpoint.every_epochs=0 --set checkpoint.resume=false \
    > "$out/ours-$1.log" 2>&1 ||
    { echo "bench/job_bench.sh: momentum-worker failed:"
      tail -20 "$out/ours-$1.log"; exit 1; } >&2
}
run_official() {  # repeat nproc
  "$python" bench/official_job.py --config "$config" "${common[@]}" "${official_run[@]}" \
    --mode "$mode" --nproc "$2" --threads "$threads" --workers "$workers" \
    --json-out "$out/official-$1.jsonl" > "$out/official-$1.log" 2>&1 ||
    { echo "bench/job_bench.sh: official_job.py failed:"
      tail -20 "$out/official-$1.log"; exit 1; } >&2
}

if [ "$mode" = synthetic ]; then
  echo "== synthetic: ONE process each (momentum-worker has no synthetic input):" \
    "bench/trainer_bench vs official_job.py --nproc 1, $threads threads"
  read -r -a tb < <("$python" - "$out/official-spec.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m, c, o = s["model"], s["moco"], s["optim"]
print(" ".join(str(x) for x in [
    "--arch", m["arch"], "--width", m["width"], "--in-channels", m["in_channels"],
    "--small-stem" if m["small_stem"] else "--no-small-stem", "--mlp" if c["mlp"] else "--no-mlp",
    "--image-size", s["data"]["image_size"], "--batch", o["batch_size"],
    "--queue", c["queue_size"], "--dim", c["dim"], "--temperature", c["temperature"],
    "--momentum", c["momentum"], "--lr", o["lr"] * o["batch_size"] / 256, "--bn-groups", 1]))
PY
  )
fi
# The two sides take turns, so that a change in the machine's load over the
# run falls on both.
for r in $(seq "$repeats"); do
  if [ "$mode" = synthetic ]; then
    "$trainer_bench" "${tb[@]}" --mode synthetic --threads "$threads" --steps "$steps" \
      --precision "$precision" \
      --warmup "$warmup" > "$out/ours-synthetic-$r.json"
    run_official "$r" 1
  else
    run_ours "$r"
    run_official "$r" "$nproc"
  fi
done

"$python" - "$out" "$mode" "${target:-none}" "$nproc" "$threads" "$workers" "$repeats" <<'PY'
import json, os, sys
out, mode, target, nproc, threads, workers, repeats = sys.argv[1:8]
repeats = range(1, int(repeats) + 1)
phases = ("data", "forward", "backward", "communication", "optimizer")


def official_summary(r):
    rows = [json.loads(l) for l in open(os.path.join(out, f"official-{r}.jsonl"))]
    assert rows and rows[-1].get("event") == "summary", f"official_job.py run {r}: no summary"
    return rows[-1]


def ours_rows(r):
    return [json.loads(l) for l in open(os.path.join(out, f"ours-{r}", "metrics.jsonl"))]


def pool(parts):
    """[(steps, images per step, images/s, step_ms)] -> (images/s, step-weighted ms)."""
    steps = sum(k for k, _, _, _ in parts)
    seconds = sum(k * b / ips for k, b, ips, _ in parts)
    keys = set.intersection(*(set(ms) for _, _, _, ms in parts))
    ms = {p: sum(k * m[p] for k, _, _, m in parts) / steps for p in keys}
    return sum(k * b for k, b, _, _ in parts) / seconds, ms


def row(name, ips, ms):
    cells = [f"{ips:>9.1f}"]
    for p in phases + ("other",):
        cells.append(f"{ms[p]:>9.1f}" if p in ms else f"{'-':>9}")
    bc = ms["backward"] + ms["communication"] if "backward" in ms else None
    cells.append(f"{bc:>9.1f}" if bc is not None else f"{'-':>9}")
    cells.append(f"{ms['total']:>9.1f}")
    print(f"{name:<34}" + " ".join(cells))


offs = [official_summary(r) for r in repeats]
off = offs[0]
if target != "none":
    target = float(target)
    ours_knn = [(w["train_seconds"], w["knn_top1"]) for w in ours_rows(1) if "knn_top1" in w]
    off_knn = [(p["train_seconds"], p["knn_top1"]) for p in off["knn"]]
    print(f"kNN top-1 by training time (target {target:.2%}):")
    for name, curve in (("ours", ours_knn), ("official", off_knn)):
        print(f"  {name:<9}" + "  ".join(f"{t:7.1f}s {a:.2%}" for t, a in curve))
    first = lambda c: next((t for t, a in c if a >= target), None)
    t_ours, t_off = first(ours_knn), first(off_knn)
    fmt = lambda t: f"{t:.1f} s" if t is not None else "not reached"
    print(f"seconds to {target:.2%}: ours {fmt(t_ours)}, official {fmt(t_off)}"
          + (f", official / ours = {t_off / t_ours:.2f}x" if t_ours and t_off else ""))
    summary = json.load(open(os.path.join(out, "ours-1", "summary.json")))
    print(f"final kNN top-1: ours {summary['knn_top1']:.2%} after {summary['epochs_completed']}"
          f" epochs; official {off['knn_top1']:.2%} after {off['epochs']:.2f} epochs")
    print(json.dumps({"target": target, "ours_seconds_to_target": t_ours,
                      "official_seconds_to_target": t_off, "ours_knn": ours_knn,
                      "official_knn": off_knn}))
    sys.exit(0)

batch = off["global_batch"]
if mode == "synthetic":
    runs = [json.load(open(os.path.join(out, f"ours-synthetic-{r}.json"))) for r in repeats]
    ours_parts = [(o["steps"], batch, o["images_per_s"], {"total": o["step_ms"]}) for o in runs]
    ours_each = [o["images_per_s"] for o in runs]
    label = "ours (trainer_bench, 1 process)"
else:
    ours_parts, ours_each = [], []
    for r in repeats:
        every = [w for w in ours_rows(r) if "images_per_s" in w]
        windows = every[1:]  # the first is the warm-up
        parts = []
        for w, before in zip(windows, every):
            ms = dict(w["step_ms"])
            ms["total"] = sum(ms[p] for p in phases)
            parts.append((w["step"] - before["step"], batch, w["images_per_s"], ms))
        ours_each.append(pool(parts)[0])
        ours_parts += parts
    label = f"ours (momentum-worker, {nproc} ranks)"
ours_ips, ours_ms = pool(ours_parts)
off_ips, off_ms = pool([(o["steps"], batch, o["images_per_s"], o["step_ms"]) for o in offs])
print(f"{'':<34}{'img/s':>9} " + " ".join(f"{p[:9]:>9}" for p in phases + ("other",))
      + f" {'bwd+comm':>9} {'step ms':>9}")
row(label, ours_ips, ours_ms)
row(f"official (official_job.py, {off['ranks']} rank{'s' if off['ranks'] > 1 else ''})",
    off_ips, off_ms)
ratio = ours_ips / off_ips
per_phase = {p: ours_ms[p] / off_ms[p] for p in phases if p in ours_ms and off_ms.get(p)}
print(f"ratio ours / official: images/s {ratio:.2f}x"
      + ("; step ms per phase " + ", ".join(f"{p} {r:.2f}" for p, r in per_phase.items())
         if per_phase else ""))
if len(repeats) > 1:
    print("images/s per repeat: ours " + " ".join(f"{v:.1f}" for v in ours_each)
          + "; official " + " ".join(f"{o['images_per_s']:.1f}" for o in offs))
print(f"({off['steps']} timed steps after {off['warmup']} warm-up, x {len(repeats)} runs in"
      f" turn, global batch {batch}, {off['ranks']} x {threads} threads"
      + (f", {workers} loader workers per rank)" if mode == "real" else ")"))
print(json.dumps({"mode": mode, "repeats": len(repeats),
                  "ours": {"images_per_s": ours_ips, "step_ms": ours_ms, "each": ours_each},
                  "official": {"images_per_s": off_ips, "step_ms": off_ms,
                               "each": [o["images_per_s"] for o in offs], "ranks": off["ranks"],
                               "threads": off["threads"], "workers": off["workers"],
                               "torch": off["torch"]},
                  "ratio_images_per_s": ratio}))
json.dump({"ours": ours_ips, "official": off_ips}, open(os.path.join(out, "rates.json"), "w"))
PY
# How near each side is to what these cores can compute (bench/roofline.py).
# Its first line only; sed reads the rest, where head would close the pipe
# under roofline.py's second print (BrokenPipeError, and pipefail ended the
# bench before the official side's line).
if [ -z "$target" ]; then
  [ "$mode" = synthetic ] && cores=$threads || cores=$((nproc * threads))
  rate() { "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
    "$out/rates.json" "$1"; }
  "$python" bench/roofline.py --spec-json "$out/official-spec.json" --cores "$cores" \
    --images-per-s "$(rate ours)" --precision "$precision" --label ours | sed -n 1p
  "$python" bench/roofline.py --spec-json "$out/official-spec.json" --cores "$cores" \
    --images-per-s "$(rate official)" --precision fp32 --label official | sed -n 1p
fi
