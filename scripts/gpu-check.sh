#!/usr/bin/env bash
# The GPU check: one command on a machine with one (or more) NVIDIA GPU and
# Python's torch 2.11.0+cu130, run from the repository root, using the
# binaries scripts/gpu-bundle.sh packed on a build machine (gpu-bundle/), or
# those of build/ when this machine builds them itself. It prints each
# check's result and writes them all as JSON to $OUT/gpu-check.json (OUT
# defaults to runs/gpu-check-<time>), with every log beside it:
#   1. linkage: every binary finds its libraries (LibTorch from the wheel);
#   2. NCCL: a group of one rank runs every collective the trainer uses;
#   3. a GPU step equals the CPU step in fp32 (relative 1e-3);
#   4. two ranks on one GPU (Gloo over CUDA tensors) equal one rank with
#      split BatchNorm;
#   5. the trainer's tests on CUDA (resume bit for bit, roll-backs) and
#      checkpoints moving between the GPU and the CPU; the batched
#      photometric augmentation on the GPU equal to the host's;
#   6. the loader alone on this machine's cores (224 px JPEG views,
#      photometric steps on the host threads or batched on the GPU), and
#      throughput of MoCo v2 with ResNet-50 at 224 px, global batch 256,
#      bf16 and fp32, synthetic and real (JPEG) input: ours and the official
#      semantics in eager PyTorch (bench/gpu_reference_bench.py), side by
#      side in this run;
#   7. the demo job (Fashion-MNIST) on the GPU: seconds to 80% kNN top-1;
#   8. the service: a CUDA job through momentum-server, a rank killed
#      mid-run, the gang restarted from its checkpoint, the export written;
#      with two GPUs or more also a NCCL group of two with a rank hung
#      (SIGSTOP) and one killed.
# Meant to finish in under 8 minutes on an H100.
#   scripts/gpu-check.sh [--quick]   (--quick: fewer bench steps, no demo)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
[ "${1:-}" = "--quick" ] && quick=1
out=${OUT:-$root/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=${MOMENTUM_GPU_PYTHON:-python3}
results="$out/results.jsonl"
: > "$results"

if [ -f gpu-bundle/binaries.tar.xz ]; then
  unpacked=${TMPDIR:-/tmp}/momentum-gpu-bundle
  rm -rf "$unpacked"
  mkdir -p "$unpacked"
  tar -xJf gpu-bundle/binaries.tar.xz -C "$unpacked"
  bin=$unpacked/bin
  lib=$unpacked/lib
  data=$root/gpu-bundle/data/fashion-mnist
  # The official baseline needs torchvision and Pillow; this machine may
  # lack them (and has no network): the bundle's wheels, unzipped.
  if ! "$py" -c 'import torchvision, PIL' 2> /dev/null; then
    mkdir -p "$unpacked/python"
    "$py" -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$unpacked/python" gpu-bundle/wheels/*.whl
    export PYTHONPATH="$unpacked/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  b=${MOMENTUM_BUILD_DIR:-$root/build}
  mkdir -p "$out/bin"
  for f in tests/process_group_test tests/moco_test tests/moco_dist_test \
    tests/trainer_test tests/device_augment_test bench/trainer_bench worker/momentum-worker \
    server/momentum-server client/momentum; do
    ln -sf "$b/$f" "$out/bin/"
  done
  bin=$out/bin
  lib=""
  data=/usr/share/datasets/fashion-mnist
fi
torch_dir=$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
nvidia=$(ls -d "$(dirname "$torch_dir")"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${lib:+$lib:}$torch_dir/lib:$nvidia${LD_LIBRARY_PATH:-}"

# record NAME STATUS SECONDS [JSON-OBJECT]: one line of results.jsonl.
record() {
  "$py" - "$@" >> "$results" <<'PY'
import json, sys
name, status, seconds = sys.argv[1:4]
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] else {}
print(json.dumps({"check": name, "status": status, "seconds": float(seconds), **extra}))
PY
  printf '%-28s %-5s %6.1fs %s\n' "$1" "$2" "$3" "${4:-}"
}

# check NAME TIMEOUT COMMAND...: runs it with its log in $out/NAME.log.
check() {
  local name=$1 limit=$2
  shift 2
  local start status
  start=$(date +%s%N)
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then status=pass; else status=FAIL; fi
  record "$name" "$status" "$(elapsed "$start")"
  [ "$status" = pass ]
}

# elapsed START_NS: seconds since then, e.g. 12.345.
elapsed() {
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
torch_version=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())' 2>&1)
record environment pass 0 "$("$py" -c 'import json,sys; print(json.dumps({"gpu": sys.argv[1], "torch": sys.argv[2], "cores": int(sys.argv[3])}))' "$gpu" "$torch_version" "$(nproc)")"

missing=$(for f in "$bin"/*; do ldd "$f" | grep "not found"; done | sort -u)
if [ -z "$missing" ]; then record linkage pass 0; else
  record linkage FAIL 0 "$("$py" -c 'import json,sys; print(json.dumps({"missing": sys.argv[1]}))' "$missing")"
fi

gtest() {  # gtest NAME TIMEOUT BINARY FILTER
  check "$1" "$2" "$bin/$3" --gtest_filter="$4" --gtest_output="json:$out/$1.json"
}
gtest nccl_one_rank 120 process_group_test 'ProcessGroupGpuTest.*'
gtest gpu_step_equals_cpu 120 moco_test 'MocoGpuTest.*'
gtest ranks_on_one_gpu 180 moco_dist_test '*OnOneGpu*'
gtest augment_on_gpu 60 device_augment_test '*'
MOMENTUM_TEST_DEVICE=cuda gtest trainer_on_cuda 300 trainer_test '*'

# ---- throughput: ResNet-50, 224 px, MoCo v2, global batch 256 ----
# Threads for the loader and LibTorch: all cores but two.
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
images=${MOMENTUM_GPU_IMAGES:-/tmp/momentum-gpu-images}
# Real input needs many steps: the loaders prefetch during the warm-up.
steps=40 warmup=10
[ $quick = 1 ] && steps=20 warmup=5
# The loader alone, 224 px views of the JPEGs: photometric steps on the host
# threads against batched on the GPU (data.augment_on).
for where in host device; do
  check "loader_${where}" 120 "$bin/trainer_bench" --device cuda --mode folder \
    --loader-only --augment-on "$where" --in-channels 3 --image-size 224 \
    --batch 256 --threads "$workers" --workers "$workers" --data "$images" \
    --steps "$steps" --warmup "$warmup"
done
if [ ! -f "$images/.complete" ]; then
  check make_images 180 "$py" bench/make_image_folder.py "$images" \
    --count 5120 && touch "$images/.complete"
fi
for precision in bf16 fp32; do
  for mode in synthetic folder; do
    n=$steps pymode=$mode
    [ "$mode" = folder ] && n=$((steps * 2)) pymode=real
    check "ours_${mode}_${precision}" 300 "$bin/trainer_bench" --device cuda \
      --precision "$precision" --arch resnet50 --in-channels 3 \
      --no-small-stem --mlp --image-size 224 --batch 256 --queue 65536 \
      --dim 128 --temperature 0.2 --momentum 0.999 --bn-groups 1 \
      --threads "$workers" --workers "$workers" --mode "$mode" \
      --augment-on device --data "$images" --steps "$n" --warmup "$warmup"
    check "official_${mode}_${precision}" 300 "$py" bench/gpu_reference_bench.py \
      --device cuda --precision "$precision" --arch resnet50 --image-size 224 \
      --batch 256 --queue 65536 --dim 128 --mode "$pymode" --data "$images" \
      --workers "$workers" --steps "$n" --warmup "$warmup"
  done
done

# ---- the demo job on the GPU: seconds to 80% kNN top-1 ----
if [ $quick = 0 ]; then
  demo=$out/demo
  check demo 420 "$bin/momentum-worker" --config examples/fashion-mnist.yaml \
    --set "output_dir=$demo" --set "data.path=$data" \
    --set resources.device=cuda --set resources.nproc=1 \
    --set data.loader_threads="$workers" --set eval.every_epochs=1 \
    --set optim.time_budget_s=60
fi

# ---- the service: a CUDA job, a rank killed mid-run, restart, export ----
# service_check NAME NPROC SIGNAL: a CUDA job of NPROC ranks through the
# server; once a checkpoint exists one rank gets SIGNAL (KILL: it dies;
# STOP: it hangs, and the coordinator's hang timeout or NCCL's watchdog must
# end the gang); the job must finish after a restart, with its export.
service_check() {
  local run=$out/$1 nproc=$2 signal=$3
  mkdir -p "$run"
  "$bin/momentum-server" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --state-dir "$run/state" --ready-file "$run/ready.json" \
    --output-root "$run" \
    --worker "$bin/momentum-worker" --gpus auto > "$run/server.log" 2>&1 &
  server_pid=$!
  trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null; trap - RETURN' RETURN
  for _ in $(seq 300); do [ -f "$run/ready.json" ] && break; sleep 0.1; done
  export MOMENTUM_SERVER
  MOMENTUM_SERVER=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$run/ready.json") || return 1
  local job
  job=$("$bin/momentum" submit examples/fashion-mnist.yaml --output json \
    --set "output_dir=$run/job" --set "data.path=$data" \
    --set resources.device=cuda --set "resources.nproc=$nproc" \
    --set optim.time_budget_s=30 --set checkpoint.every_steps=40 \
    --set resources.timeout_s=30 --set scheduling.hang_timeout_s=30 |
    "$py" -c 'import json,sys; print(json.load(sys.stdin)["id"])') || return 1
  # Kill the rank once a checkpoint exists; the gang must come back from it.
  for _ in $(seq 600); do
    ls "$run/job/checkpoints/"*.pt > /dev/null 2>&1 && break
    sleep 0.2
  done
  local victim
  victim=$(pgrep -f "momentum-worker.*$run/job" | tail -1)
  [ -n "$victim" ] || victim=$(pgrep -f momentum-worker | tail -1)
  [ -n "$victim" ] || return 1
  kill -"$signal" "$victim"
  timeout 300 "$bin/momentum" watch "$job" > "$run/watch.log" 2>&1
  kill -KILL "$victim" 2>/dev/null
  "$bin/momentum" get "$job" --output json > "$run/job.json" || return 1
  "$py" - "$run/job.json" "$run/job/backbone.pt" <<'PY'
import json, os, sys
job = json.load(open(sys.argv[1]))
print(json.dumps(job, indent=1))
assert job["state"].endswith("SUCCEEDED"), job["state"]
assert int(job.get("restarts", 0)) >= 1, "no restart after the kill"
assert os.path.getsize(sys.argv[2]) > 0
PY
}
# service NAME NPROC SIGNAL: service_check, timed and recorded.
service() {
  local start status
  start=$(date +%s%N)
  if service_check "$@" > "$out/$1.log" 2>&1; then status=pass; else status=FAIL; fi
  record "$1" "$status" "$(elapsed "$start")"
}
service service_killed_rank 1 KILL
# NCCL refuses two ranks on one GPU: the faults of a NCCL group need two.
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  service service_nccl_hung_rank 2 STOP
  service service_nccl_killed_rank 2 KILL
fi

"$py" - "$results" "$out" <<'PY'
import json, os, sys
results = [json.loads(l) for l in open(sys.argv[1])]
out = sys.argv[2]
def bench(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".log")) if l.startswith("{")]
        return json.loads(lines[-1])
    except (OSError, IndexError, ValueError):
        return None
throughput = {}
for mode in ("synthetic", "folder"):
    for precision in ("bf16", "fp32"):
        ours, official = bench(f"ours_{mode}_{precision}"), bench(f"official_{mode}_{precision}")
        row = {"ours": ours and ours["images_per_s"], "official": official and official["images_per_s"]}
        if row["ours"] and row["official"]:
            row["ratio"] = row["ours"] / row["official"]
        throughput[f"{mode}_{precision}"] = row
demo = None
metrics = os.path.join(out, "demo", "metrics.jsonl")
if os.path.exists(metrics):
    for line in open(metrics):
        j = json.loads(line)
        if j.get("knn_top1", 0) >= 0.80:
            demo = {"seconds_to_80": j["train_seconds"], "epochs": j.get("epochs_completed")}
            break
for r in results:
    # A GPU test skips itself where no GPU is visible: not a pass.
    try:
        g = json.load(open(os.path.join(out, r["check"] + ".json")))
        skipped = sum(1 for s in g["testsuites"] for t in s["testsuite"]
                      if t.get("result") == "SKIPPED")
        r["tests"], r["skipped"] = g["tests"], skipped
        if r["status"] == "pass" and skipped:
            r["status"] = "skipped"
    except (OSError, ValueError, KeyError):
        pass
loader = {w: (bench(f"loader_{w}") or {}).get("images_per_s") for w in ("host", "device")}
summary = {"checks": results, "throughput_images_per_s": throughput, "demo": demo,
           "loader_images_per_s": loader,
           "passed": all(r["status"] == "pass" for r in results)}
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print(json.dumps({"throughput_images_per_s": throughput, "loader_images_per_s": loader,
                  "demo": demo, "passed": summary["passed"]}, indent=1))
PY
