#!/usr/bin/env bash
# A job spread over two node agents on two "machines": two network
# namespaces joined by a veth pair (10.231.7.1 and 10.231.7.2), with nothing
# shared over loopback. The coordinator and one agent live in the first, the
# other agent in the second; a 2-rank job must rendezvous and train across
# the link and succeed, with one rank on each agent. Off loopback the server
# needs TLS: a throw-away CA (openssl) signs its certificate, and agents,
# ranks and client trust that CA.
#   netns_agents_test.sh BINARY_DIR
# Needs root (ip netns); exits 77 (skipped) without it.
set -euo pipefail
bin=$1
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "skipped: needs root and iproute2 for network namespaces"
  exit 77
fi
ns_a=momentum-a-$$ ns_b=momentum-b-$$
work=$(mktemp -d /tmp/momentum-netns-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if ! ip netns add "$ns_a" 2>/dev/null; then
  echo "skipped: cannot create network namespaces here"
  exit 77
fi
ip netns add "$ns_b"
# `ip netns exec` remounts / as a slave and /sys for the namespace, which a
# chroot or a container without CAP_SYS_ADMIN over its mounts refuses.
if ! err=$(ip netns exec "$ns_a" true 2>&1); then
  echo "skipped: cannot run processes in a network namespace here (ip netns exec: ${err:-failed})"
  exit 77
fi
ip link add "veth-a$$" type veth peer name "veth-b$$"
ip link set "veth-a$$" netns "$ns_a"
ip link set "veth-b$$" netns "$ns_b"
ip -n "$ns_a" addr add 10.231.7.1/24 dev "veth-a$$"
ip -n "$ns_b" addr add 10.231.7.2/24 dev "veth-b$$"
for ns in "$ns_a" "$ns_b"; do
  ip -n "$ns" link set lo up
done
ip -n "$ns_a" link set "veth-a$$" up
ip -n "$ns_b" link set "veth-b$$" up

# The project's Python (its grpcio): python_client_test imports grpc.
"${MOMENTUM_PYTHON:-python3}" -c "
import sys; sys.path.insert(0, '$(dirname "$0")')
from python_client_test import write_fake_fashion_mnist
write_fake_fashion_mnist('$work/data', 64, 30)"

pki=$work/pki
mkdir -p "$pki"
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=netns test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=coordinator" \
    -keyout server.key -out server.csr 2>/dev/null
  echo "subjectAltName=IP:10.231.7.1" > san.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days 2 -extfile san.cnf -out server.pem 2>/dev/null
)
export MOMENTUM_TLS_CA=$pki/ca.pem

ip netns exec "$ns_a" "$bin/server/momentum-server" --listen 10.231.7.1:0 \
  --tls-cert "$pki/server.pem" --tls-key "$pki/server.key" \
  --metrics-listen 127.0.0.1:0 --state-dir "$work/state" --slots 0 --gpus none \
  --worker "$bin/worker/momentum-worker" --ready-file "$work/ready.json" \
  > "$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -f "$work/ready.json" ] && break; sleep 0.1; done
if [ ! -f "$work/ready.json" ]; then
  echo "FAILED: the coordinator did not start"
  cat "$work/server.log"
  exit 1
fi
server=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$work/ready.json")
echo "coordinator on $server in $ns_a"

ip netns exec "$ns_a" "$bin/server/momentum-agent" --server "$server" \
  --slots 1 --gpus none --name here --advertise 10.231.7.1 --work-dir "$work/agent-a" \
  --worker "$bin/worker/momentum-worker" > "$work/agent-a.log" 2>&1 &
pids+=($!)
sleep 0.5
ip netns exec "$ns_b" "$bin/server/momentum-agent" --server "$server" \
  --slots 1 --gpus none --name there --advertise 10.231.7.2 --work-dir "$work/agent-b" \
  --worker "$bin/worker/momentum-worker" > "$work/agent-b.log" 2>&1 &
pids+=($!)

cat > "$work/job.yaml" <<EOF
name: two-machines
output_dir: out
model: {width: 4, in_channels: 1, small_stem: true}
moco: {dim: 8, queue_size: 24}
data: {path: $work/data, loader_threads: 1}
optim: {batch_size: 16, lr: 0.1, epochs: 2}
eval: {every_epochs: 1, knn_k: 5}
logging: {every_steps: 2}
resources: {threads: 1, nproc: 2, timeout_s: 60}
EOF
momentum() { ip netns exec "$ns_a" "$bin/client/momentum" --server "$server" "$@"; }
status=0
momentum submit "$work/job.yaml" --wait || status=$?
momentum get job-1 --output json > "$work/job.json"
if [ $status != 0 ]; then
  echo "FAILED: the job did not succeed"
  cat "$work/server.log" "$work/agent-a.log" "$work/agent-b.log"
  momentum logs job-1 || true
  exit 1
fi
reason=$(momentum get job-1 --output json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["state_reason"])')
echo "final: $reason"
# One rank ran on each agent: each was handed a spec for this job.
for agent in agent-a agent-b; do
  if [ ! -f "$work/$agent/job-1/attempt-1/spec.yaml" ]; then
    echo "FAILED: $agent ran no rank"
    exit 1
  fi
done
echo "ok: a 2-rank job trained across two network namespaces, one rank in each"
