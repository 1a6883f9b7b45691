#!/bin/sh
# run_crosscheck.sh TOOL DIR PYTHON [--rtol R] [moco_crosscheck flags]: the
# C++ trainer runs its steps and dumps them into DIR, then the Python
# reference replays and compares them: crosscheck.py for one rank,
# crosscheck_dist.py (on torch.distributed ranks) when the flags hold
# --world-size. --rtol (default 1e-4) goes to the comparison.
set -eu
tool=$1 dir=$2 python=$3
shift 3
rtol=1e-4
if [ "${1:-}" = --rtol ]; then
  rtol=$2
  shift 2
fi
checker=crosscheck.py
for arg in "$@"; do
  [ "$arg" = --world-size ] && checker=crosscheck_dist.py
done
mkdir -p "$dir"
"$tool" --init "$dir/init.pt" --result "$dir/result.pt" "$@"
exec "$python" "$(dirname "$0")/$checker" "$dir/init.pt" "$dir/result.pt" --rtol "$rtol"
