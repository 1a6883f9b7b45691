#!/usr/bin/env bash
# Runs the command given when `kubectl kustomize` is new enough for deploy/
# (kustomize v4.5 or later: `labels`, `replacements`, components), and
# reports the test skipped (exit 77) otherwise, saying why. Debian 12's own
# kubectl (kubernetes-client 1.20) bundles kustomize v2; kubectl 1.24 and
# later print the kustomize they bundle.
set -euo pipefail
if ! command -v kubectl >/dev/null 2>&1; then
  echo "SKIP: no kubectl on PATH (deploy/ needs kubectl >= 1.27 for kustomize >= v4.5)"
  exit 77
fi
version=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9.]*\).*/\1/p')
if [ -z "$version" ]; then
  echo "SKIP: $(command -v kubectl) does not say which kustomize it bundles (older than kubectl 1.24); deploy/ needs kustomize >= v4.5"
  exit 77
fi
major=${version%%.*}
rest=${version#*.}
minor=${rest%%.*}
if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 5 ]; }; then
  echo "SKIP: kubectl bundles kustomize v$version; deploy/ needs v4.5 or later"
  exit 77
fi
exec "$@"
