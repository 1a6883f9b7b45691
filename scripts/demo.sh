#!/usr/bin/env bash
# Installs what is missing, builds momentum-worker and trains the example job
# (examples/fashion-mnist.yaml: MoCo v2 on Fashion-MNIST with a 10-minute
# training budget), then prints the kNN result. Extra arguments go to the
# worker, e.g. --set optim.time_budget_s=60.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
momentum_install_packages
momentum_build momentum-worker
out=runs/fashion-mnist-$(date +%Y%m%d-%H%M%S)
echo "demo: training into $out"
"${MOMENTUM_BUILD_DIR:-build}/worker/momentum-worker" \
  --config examples/fashion-mnist.yaml --set "output_dir=$out" "$@"
/usr/bin/python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("kNN top-1 curve:")
for r in s["knn_curve"]:
    print(f"  after {r['epochs']:5.2f} epochs (step {r['step']:5d}): {100 * r['knn_top1']:.2f}%")
print(f"final kNN top-1 on the 10,000 test images: {100 * s['knn_top1']:.2f}% "
      f"after {s['train_seconds']:.0f} s of training ({s['images_seen']} images)")
PY
