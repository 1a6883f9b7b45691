#!/usr/bin/env bash
# Scaling of distributed training on this machine, side by side in one run:
#   A  1 rank,  1 thread,  batch B
#   B  2 ranks, 1 thread each, batch B per rank (global 2B), both in this
#      network namespace: the ranks talk over loopback
#   C  1 rank,  2 threads, batch 2B
#   D  as B, but each rank in its own network namespace ("two hosts")
#   D' as D with a tc qdisc on the link (--qdisc, by default netem), when
#      tc and the qdisc are available
# on Fashion-MNIST with the demo's model (examples/fashion-mnist.yaml), each
# run by the real momentum-worker for a fixed number of steps. Reports
#   scaling efficiency  = img/s(B) / (2 * img/s(A))      (target >= 0.9)
#   ranks vs threads    = img/s(B) / img/s(C)
#   two hosts vs one    = img/s(D) / img/s(B)
# and where B's and D's step time goes (data, forward, backward,
# communication, optimizer), from the worker's metrics, with the share of
# communication. The first logging window of every run (start-up, allocator
# warm-up) is left out; the runs are repeated --repeats times in turn
# (A B C D D', A B C D D', ...) and averaged.
#
# The "two hosts" of D: two network namespaces, momentum-scaling-{a,b}-PID,
# joined by a veth pair msc-aPID (10.77.0.1/24) -- msc-bPID (10.77.0.2/24),
# loopback up in each. Rank 0 runs in the first, rank 1 in the second, each
# started with `ip netns exec` as a rank of its own (RANK, WORLD_SIZE=2,
# LOCAL_RANK=0, MASTER_ADDR=10.77.0.1, MASTER_PORT=29500, and
# MOMENTUM_LOCAL_ADDR set to its veth address so that Gloo binds there), with
# the spec and --set overrides of B. The TCPStore rendezvous, the key
# all-gathers and permutation broadcast of shuffled BN, the queue's gathers
# and the gradient all-reduces then cross the kernel's network stack
# (TCP over the veth pair) instead of loopback. For D' both ends of the
# link get `tc qdisc add dev VETH root QDISC` (default "netem delay 0.2ms
# rate 10gbit": 0.4 ms round trip, 10 Gbit/s each way; "tbf rate 1gbit
# burst 64kb latency 1ms" where the kernel has no netem) and lose it again
# before the next D. Both ranks still share this machine's cores and the
# veth pair has no wire: D adds the network stack's cost, not a real NIC's
# bandwidth or latency (D' models those). Both namespaces (and with them the
# veth pair) are deleted on every exit, failure and Ctrl-C included. D needs
# root and `ip netns`; without them it is skipped with a note, and without
# tc or the qdisc D' is.
#
#   bench/scaling.sh [--batch B] [--steps N] [--repeats R] [--worker PATH]
#                    [--qdisc "KIND ARGS" | --qdisc none] [--no-hosts]
# --worker runs that momentum-worker binary and skips the setup and build
# (the ctest passes the build's worker); --no-hosts skips D and D'.
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=128 steps=60 repeats=2 worker="" qdisc="netem delay 0.2ms rate 10gbit" hosts=1
while [ $# -gt 0 ]; do
  case $1 in
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --worker) worker=$2; shift 2 ;;
    --qdisc) qdisc=$2; shift 2 ;;
    --no-hosts) hosts=0; shift ;;
    *) echo "bench/scaling.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$worker" ]; then
  source scripts/setup.sh
  momentum_install_packages
  momentum_python_env
  momentum_build momentum-worker
  worker=${MOMENTUM_BUILD_DIR:-build}/worker/momentum-worker
fi
worker=$(realpath "$worker")

out=$(mktemp -d)
ns=(momentum-scaling-a-$$ momentum-scaling-b-$$)
veth=(msc-a$$ msc-b$$)
addr=(10.77.0.1 10.77.0.2)
port=29500
rank_pids=()
cleanup() {
  local p
  for p in "${rank_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${rank_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # Deleting a namespace deletes the veth end inside it, and with it the
  # pair; the link is deleted by name for when it never moved.
  ip netns del "${ns[0]}" 2>/dev/null || true
  ip netns del "${ns[1]}" 2>/dev/null || true
  ip link del "${veth[0]}" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The two "hosts"; prints why not and returns 1 when they cannot be made.
# Run in a command substitution: it must leave nothing but the namespaces
# and the link behind (cleanup deletes them by name).
hosts_up() {
  if [ "$(id -u)" != 0 ]; then echo "not root"; return 1; fi
  if ! command -v ip >/dev/null; then echo "no ip (iproute2)"; return 1; fi
  local err
  if ! err=$(ip netns add "${ns[0]}" 2>&1) || ! err=$(ip netns add "${ns[1]}" 2>&1); then
    echo "ip netns add failed: $err"; return 1
  fi
  # `ip netns exec` remounts /sys for the namespace, which some containers
  # refuse.
  if ! err=$(ip netns exec "${ns[0]}" true 2>&1); then
    echo "ip netns exec failed: ${err:-no message}"; return 1
  fi
  if ! err=$({ ip link add "${veth[0]}" type veth peer name "${veth[1]}" &&
               for i in 0 1; do
                 ip link set "${veth[i]}" netns "${ns[i]}" &&
                 ip -n "${ns[i]}" addr add "${addr[i]}/24" dev "${veth[i]}" &&
                 ip -n "${ns[i]}" link set lo up &&
                 ip -n "${ns[i]}" link set "${veth[i]}" up || exit 1
               done; } 2>&1); then
    echo "veth setup failed: $err"; return 1
  fi
  if command -v ping >/dev/null &&
     ! err=$(ip netns exec "${ns[1]}" ping -c 1 -W 2 "${addr[0]}" 2>&1); then
    echo "${addr[1]} cannot reach ${addr[0]}: $err"; return 1
  fi
}
# Prints why not and returns 1 when the qdisc cannot shape the link.
qdisc_works() {
  local err
  if [ "$qdisc" = none ]; then echo "--qdisc none"; return 1; fi
  if ! command -v tc >/dev/null; then echo "no tc"; return 1; fi
  if ! err=$(set_qdisc add 2>&1); then
    echo "tc qdisc add ... root $qdisc failed: $err"; set_qdisc del; return 1
  fi
  set_qdisc del
}
set_qdisc() {  # add | del
  local i
  for i in 0 1; do
    # shellcheck disable=SC2086 # the qdisc's arguments are words
    if [ "$1" = add ]; then
      ip netns exec "${ns[i]}" tc qdisc add dev "${veth[i]}" root $qdisc || return 1
    else
      ip netns exec "${ns[i]}" tc qdisc del dev "${veth[i]}" root 2>/dev/null || true
    fi
  done
}

names="ABC" skipped_d="" skipped_dn=""
if [ "$hosts" = 0 ]; then
  skipped_d="--no-hosts"
elif ! skipped_d=$(hosts_up); then
  :
else
  skipped_d=""
  names+="D"
  if skipped_dn=$(qdisc_works); then skipped_dn=""; names+="E"; fi
fi
[ -n "$skipped_d" ] && echo "bench/scaling.sh: D (two hosts) skipped: $skipped_d"
[ -z "$skipped_d" ] && [ -n "$skipped_dn" ] &&
  echo "bench/scaling.sh: D' (two hosts, tc qdisc on the link) skipped: $skipped_dn"

every=$((steps / 6)); [ "$every" -ge 1 ] || every=1
spec=(--config examples/fashion-mnist.yaml)
common() {  # output_dir threads global_batch
  printf '%s\n' --set output_dir="$1" --set resources.threads="$2" \
    --set optim.batch_size="$3" --set optim.time_budget_s=0 \
    --set optim.steps="$steps" --set logging.every_steps="$every" \
    --set eval.every_epochs=0 --set eval.max_train=2000 \
    --set eval.max_test=500 --set checkpoint.every_epochs=0 \
    --set moco.bn=shuffle --set resources.timeout_s=60
  # (A hung collective fails the run in a minute, and the trap still removes
  # the namespaces, before a caller's own timeout could kill this script.)
}
run() {  # name nproc threads global_batch repeat
  local dir=$out/$1-$5 args
  mapfile -t args < <(common "$dir" "$3" "$4")
  "$worker" --nproc "$2" "${spec[@]}" "${args[@]}" > "$dir.log" 2>&1 ||
    { echo "bench/scaling.sh: run $1 failed:"; tail -5 "$dir.log"; exit 1; } >&2
}
# One rank in each namespace, as two agents on two machines would start
# them; when one fails, the other is stopped.
run_hosts() {  # name repeat
  local dir=$out/$1-$2 args i id rc failed=""
  mapfile -t args < <(common "$dir" 1 $((2 * batch)))
  rank_pids=()
  for i in 0 1; do
    ip netns exec "${ns[i]}" env RANK=$i WORLD_SIZE=2 LOCAL_RANK=0 \
      LOCAL_WORLD_SIZE=1 MASTER_ADDR="${addr[0]}" MASTER_PORT=$port \
      MOMENTUM_LOCAL_ADDR="${addr[i]}" \
      "$worker" "${spec[@]}" "${args[@]}" > "$dir.rank$i.log" 2>&1 &
    rank_pids+=($!)
  done
  local left=("${rank_pids[@]}")
  while [ ${#left[@]} -gt 0 ]; do
    rc=0
    wait -n -p id "${left[@]}" || rc=$?
    if [ "$rc" != 0 ]; then
      [ "$id" = "${rank_pids[0]}" ] && failed=0 || failed=1
      break
    fi
    [ "${left[0]}" = "$id" ] && left=("${left[@]:1}") || left=("${left[0]}")
  done
  if [ -n "$failed" ]; then
    for i in 0 1; do kill -TERM "${rank_pids[i]}" 2>/dev/null || true; done
    for i in 0 1; do wait "${rank_pids[i]}" 2>/dev/null || true; done
    rank_pids=()
    { echo "bench/scaling.sh: run $1 failed (rank $failed, exit $rc):"
      tail -5 "$dir.rank$failed.log"; exit 1; } >&2
  fi
  rank_pids=()
}
for r in $(seq "$repeats"); do
  run A 1 1 "$batch" "$r"
  run B 2 1 $((2 * batch)) "$r"
  run C 1 2 $((2 * batch)) "$r"
  if [[ $names == *D* ]]; then run_hosts D "$r"; fi
  if [[ $names == *E* ]]; then
    set_qdisc add
    run_hosts E "$r"
    set_qdisc del
  fi
done
/usr/bin/python3 - "$out" "$repeats" "$batch" "$names" "$qdisc" "$skipped_d" "$skipped_dn" <<'PY'
import json, os, sys
out, repeats, batch, names, qdisc, skipped_d, skipped_dn = sys.argv[1:]
repeats, batch = int(repeats), int(batch)
DN = "D'"
phases = ("data", "forward", "backward", "communication", "optimizer")
shown = {"A": "A", "B": "B", "C": "C", "D": "D", "E": "D'"}

def windows(name, r):
    rows = [json.loads(l) for l in open(os.path.join(out, f"{name}-{r}", "metrics.jsonl"))]
    return [w for w in rows if "images_per_s" in w][1:]

res = {}
for name in names:
    ws = [w for r in range(1, repeats + 1) for w in windows(name, r)]
    res[shown[name]] = {
        "images_per_s": sum(w["images_per_s"] for w in ws) / len(ws),
        "step_ms": {p: sum(w["step_ms"][p] for w in ws) / len(ws) for p in phases},
    }
labels = {"A": f"1 rank x 1 thread, batch {batch}",
          "B": f"2 ranks x 1 thread, batch {batch} per rank",
          "C": f"1 rank x 2 threads, batch {2 * batch}",
          "D": "as B, one rank per netns (veth)",
          "D'": f"as D, {qdisc.split()[0]} on the link"}
print(f"{'run':<44} {'img/s':>8}  step ms: " + " ".join(f"{p:>13}" for p in phases))
for name in res:
    r = res[name]
    print(f"{name:<2} {labels[name]:<41} {r['images_per_s']:>8.1f}           "
          + " ".join(f"{r['step_ms'][p]:>13.1f}" for p in phases))

def share(name):
    s = res[name]["step_ms"]
    return s["communication"] / sum(s.values())

def ratio(a, b):
    return res[a]["images_per_s"] / res[b]["images_per_s"] if a in res else None

eff = res["B"]["images_per_s"] / (2 * res["A"]["images_per_s"])
switch = ratio("B", "C")
print(f"scaling efficiency B / 2A = {eff:.3f} (target >= 0.9)")
print(f"2 ranks vs 2 threads B / C = {switch:.2f}x")
print(f"communication share of B's step = {100 * share('B'):.1f}%")
if "D" in res:
    print(f"two hosts vs one host D / B = {ratio('D', 'B'):.3f}")
    print(f"communication share of D's step = {100 * share('D'):.1f}%")
else:
    print(f"D (two hosts) skipped: {skipped_d}")
if "D'" in res:
    print(f"with {qdisc} D' / D = {ratio(DN, 'D'):.3f}")
    print(f"communication share of D' step = {100 * share(DN):.1f}%")
elif "D" in res:
    print(f"D' ({qdisc}) skipped: {skipped_dn}")
skipped = {}
if "D" not in res:
    skipped = {"D": skipped_d, DN: skipped_d}
elif DN not in res:
    skipped = {DN: skipped_dn}
print(json.dumps({
    "scaling_efficiency": eff, "ranks_vs_threads": switch,
    "communication_share": share("B"),
    "two_hosts_vs_one_host": ratio("D", "B"),
    "communication_share_two_hosts": share("D") if "D" in res else None,
    "qdisc": qdisc if DN in res else None,
    "qdisc_vs_two_hosts": ratio(DN, "D"),
    "communication_share_qdisc": share(DN) if DN in res else None,
    "skipped": skipped,
    "runs": res}))
PY
