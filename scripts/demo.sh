#!/usr/bin/env bash
# The main job through the service: installs what is missing, builds the
# binaries, starts momentum-server with its embedded defaults (local ranks,
# SQLite store; here in runs/demo-<timestamp>/state and on ports the OS
# picks), submits examples/fashion-mnist.yaml (MoCo v2 on Fashion-MNIST, 2
# ranks, 10 minutes of training) with the momentum client, watches it to the
# end, prints the kNN result and where the exported encoder lies, and stops
# the server. Extra arguments go to `momentum submit`, e.g.
#   scripts/demo.sh --set optim.time_budget_s=60
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
momentum_install_packages
momentum_python_env
momentum_build momentum-server momentum-worker momentum_cli
build=${MOMENTUM_BUILD_DIR:-build}
run=runs/demo-$(date +%Y%m%d-%H%M%S)
mkdir -p "$run"
echo "demo: momentum-server with its state in $run/state"
"$build/server/momentum-server" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --state-dir "$run/state" \
  --ready-file "$run/ready.json" > "$run/server.log" 2>&1 &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  [ -f "$run/ready.json" ] && break
  kill -0 $server_pid 2>/dev/null || { cat "$run/server.log" >&2; exit 1; }
  sleep 0.1
done
export MOMENTUM_SERVER
MOMENTUM_SERVER=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$run/ready.json")
metrics=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"])' "$run/ready.json")
echo "demo: serving on $MOMENTUM_SERVER, Prometheus metrics on http://$metrics/metrics"
momentum="$build/client/momentum"
# The example's two ranks each need a GPU of their own where the server
# offers GPUs (resources.device auto becomes cuda): one rank on a machine
# with a single GPU.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fit=()
if [ "${gpus:-0}" -eq 1 ]; then fit=(--set resources.nproc=1); fi
job=$("$momentum" submit examples/fashion-mnist.yaml --output json "${fit[@]}" "$@" |
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "demo: submitted $job; watching it (momentum watch $job)"
status=0
"$momentum" watch "$job" || status=$?
"$momentum" get "$job" --output json > "$run/job.json"
/usr/bin/python3 - "$run/job.json" <<'PY'
import json, os, sys
job = json.load(open(sys.argv[1]))
summary = os.path.join(job["output_dir"], "summary.json")
if os.path.exists(summary):
    s = json.load(open(summary))
    print("kNN top-1 curve:")
    for r in s["knn_curve"]:
        print(f"  after {r['epochs']:5.2f} epochs (step {r['step']:5d}): {100 * r['knn_top1']:.2f}%")
    print(f"final kNN top-1 on the 10,000 test images: {100 * s['knn_top1']:.2f}% "
          f"after {s['train_seconds']:.0f} s of training ({s['images_seen']} images, "
          f"{s['world_size']} ranks)")
print(f"job {job['id']}: {job['state']} ({job.get('state_reason', '')})")
if job.get("export_path"):
    print(f"exported encoder (PyTorch state_dict of the backbone): {job['export_path']}")
PY
exit $status
