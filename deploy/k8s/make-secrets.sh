#!/usr/bin/env bash
# Makes real TLS material and tokens for a Momentum deployment, and a
# kustomization that deploys an overlay with them in place of the base's
# example Secrets (docs/deploy.md, "Secrets").
#
#   deploy/k8s/make-secrets.sh OUTDIR [cpu|gpu] [USER ...]
#
# OUTDIR (created; keep it out of git) gets:
#   ca.crt ca.key            a private CA; it signs the server and every client
#   server.crt server.key    the coordinator (names: momentum-coordinator[.momentum[.svc[.cluster.local]]], localhost)
#   agent.crt agent.key      the client certificate all agents share
#   user-NAME.crt/.key       one client certificate per user (default: one user "admin")
#   tokens                   the coordinator's token file: one "user" token per user, one "agent" token
#   agent-token              the agent token alone (what the agents mount)
#   user-NAME.token          each user's token (for `momentum --token-file`)
#   kustomization.yaml       resources: the overlay; secretGenerator: behavior replace
# Then: kubectl apply -k OUTDIR
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [cpu|gpu] [USER ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
overlay=cpu
if [ $# -ge 1 ]; then overlay=$1; shift; fi
case "$overlay" in cpu|gpu) ;; *) echo "$0: overlay must be cpu or gpu, got '$overlay'" >&2; exit 2 ;; esac
users=("$@")
[ ${#users[@]} -gt 0 ] || users=(admin)
for u in "${users[@]}"; do
  [[ "$u" =~ ^[a-z0-9][a-z0-9-]*$ ]] || { echo "$0: user name '$u': use [a-z0-9-]" >&2; exit 2; }
done
# The Service's DNS names the server certificate must carry.
ns=${MOMENTUM_NAMESPACE:-momentum}
days=${MOMENTUM_CERT_DAYS:-825}
here=$(cd "$(dirname "$0")" && pwd)

command -v openssl >/dev/null || { echo "$0: openssl is needed (apt-get install openssl)" >&2; exit 2; }
umask 077
mkdir -p "$out"
cd "$out"

# Private keys: ECDSA P-256 (gRPC's TLS supports it everywhere).
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=momentum-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.crt

# sign NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
sign() {
  local name=$1 cn=$2 eku=$3 san=${4:-}
  key "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

svc=momentum-coordinator
sign server "$svc" serverAuth \
  "DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
sign agent momentum-agent clientAuth
for u in "${users[@]}"; do sign "user-$u" "$u" clientAuth; done
rm -f ca.srl

# Tokens: 32 hex digits from the system's CSPRNG (the server wants >= 16 characters).
tok() { openssl rand -hex 16; }
agent_token=$(tok)
{
  echo "# TOKEN NAME ROLE (docs/security.md)"
  for u in "${users[@]}"; do
    t=$(tok); printf '%s\n' "$t" > "user-$u.token"
    echo "$t $u user"
  done
  echo "$agent_token agents agent"
} > tokens
printf '%s\n' "$agent_token" > agent-token

rel=$(realpath --relative-to="$PWD" "$here/overlays/$overlay")
cat > kustomization.yaml <<KUST
# Made by deploy/k8s/make-secrets.sh: the $overlay overlay with this folder's
# certificates and tokens. Keep this folder secret and out of git.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $rel
secretGenerator:
  - name: momentum-server-tls
    behavior: replace
    type: kubernetes.io/tls
    files: [tls.crt=server.crt, tls.key=server.key, ca.crt=ca.crt]
  - name: momentum-server-tokens
    behavior: replace
    files: [tokens=tokens]
  - name: momentum-agent-tls
    behavior: replace
    type: kubernetes.io/tls
    files: [tls.crt=agent.crt, tls.key=agent.key, ca.crt=ca.crt]
  - name: momentum-agent-token
    behavior: replace
    files: [token=agent-token]
KUST
echo "wrote $PWD (overlay $overlay, users: ${users[*]}); deploy with: kubectl apply -k $PWD"
