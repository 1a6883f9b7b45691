#!/usr/bin/env bash
# bench/scaling.sh in a tiny configuration (batch 16, 12 steps, one repeat):
# it prints the rows A, B, C and D (two ranks in two network namespaces
# joined by a veth pair) with positive img/s and communication time for the
# ranks, and a JSON summary that parses and holds D; afterwards neither its
# namespaces nor its veth pair nor its temporary folder are left. A second
# run stopped by SIGTERM while it trains leaves nothing behind either.
#   scaling_test.sh SOURCE_DIR WORKER
# Needs root (ip netns) and Debian's Fashion-MNIST; exits 77 (skipped)
# without them. About 60 s on two idle cores.
set -euo pipefail
src=$1 worker=$2
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "skipped: needs root and iproute2 for network namespaces"
  exit 77
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "skipped: needs Fashion-MNIST (Debian's dataset-fashion-mnist)"
  exit 77
fi
work=$(mktemp -d /tmp/momentum-scaling-test-XXXXXX)
bench_pid=""
cleanup() {
  if [ -n "$bench_pid" ]; then kill -TERM "$bench_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAILED: $*"; exit 1; }

# Nothing named after bench/scaling.sh's process PID is left: no namespace,
# no veth end in this namespace; and its temporary folder is gone.
check_left() {  # PID
  local names
  names=$(ip netns list | awk '{print $1}' | grep -E "^momentum-scaling-[ab]-$1\$" || true)
  [ -z "$names" ] || fail "namespaces left behind: $names"
  names=$(ip -o link show | grep -oE "msc-[ab]$1\b" || true)
  [ -z "$names" ] || fail "veth left behind: $names"
  [ -z "$(ls -A "$work/tmp")" ] || fail "files left in TMPDIR: $(ls "$work/tmp")"
}

mkdir -p "$work/tmp"
TMPDIR=$work/tmp "$src/bench/scaling.sh" --worker "$worker" --batch 16 \
  --steps 12 --repeats 1 --qdisc none > "$work/out.txt" 2>&1 &
bench_pid=$!
status=0
wait "$bench_pid" || status=$?
pid=$bench_pid bench_pid=""
cat "$work/out.txt"
[ "$status" = 0 ] || fail "bench/scaling.sh exited $status"
check_left "$pid"
/usr/bin/python3 - "$work/out.txt" <<'PY' || fail "the output is not as expected"
import json, sys
lines = open(sys.argv[1]).read().splitlines()
rows = {}
for line in lines:
    parts = line.split()
    if parts and parts[0] in ("A", "B", "C", "D") and len(parts) > 6:
        # name, label..., img/s, then five phases in ms
        rows[parts[0]] = (float(parts[-6]), [float(p) for p in parts[-5:]])
assert sorted(rows) == ["A", "B", "C", "D"], f"rows: {sorted(rows)}"
for name, (ips, _) in rows.items():
    assert ips > 0, f"{name}: img/s {ips}"
for name in ("B", "D"):
    assert rows[name][1][3] > 0, f"{name}: no communication time"
summary = json.loads([l for l in lines if l.startswith("{")][-1])
assert sorted(summary["runs"]) == ["A", "B", "C", "D"], sorted(summary["runs"])
for name, run in summary["runs"].items():
    assert run["images_per_s"] > 0, (name, run)
assert summary["two_hosts_vs_one_host"] > 0, summary
assert 0 < summary["communication_share_two_hosts"] < 1, summary
assert "D" not in summary["skipped"], summary["skipped"]
print("ok: rows A B C D, JSON summary with D")
PY

# Stopped while it trains: the trap still removes the namespaces.
TMPDIR=$work/tmp "$src/bench/scaling.sh" --worker "$worker" --batch 16 \
  --steps 12 --repeats 1 --qdisc none > "$work/stopped.txt" 2>&1 &
bench_pid=$!
for _ in $(seq 100); do
  ip netns list | grep -q "^momentum-scaling-b-$bench_pid\b" && break
  sleep 0.1
done
ip netns list | grep -q "^momentum-scaling-b-$bench_pid\b" ||
  { cat "$work/stopped.txt"; fail "the second run made no namespaces"; }
sleep 1
kill -TERM "$bench_pid"
status=0
wait "$bench_pid" || status=$?
pid=$bench_pid bench_pid=""
[ "$status" != 0 ] || fail "the stopped run exited 0"
check_left "$pid"
echo "ok: nothing left behind after a full run and after SIGTERM"
