#!/usr/bin/env bash
# Installs the Debian packages Momentum needs to build, test and run, when any
# is missing (quick when all are there). Sourced by test.sh and demo.sh; runs
# as root, or through sudo when it is available.
set -euo pipefail

MOMENTUM_PACKAGES=(
  g++ cmake ninja-build pkg-config ccache git
  libtorch-dev libgloo-dev libopenblas0-openmp
  libabsl-dev libyaml-cpp-dev libcli11-dev nlohmann-json3-dev libspdlog-dev
  libjpeg62-turbo-dev libpng-dev zlib1g-dev
  libgrpc++-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  prometheus-cpp-dev libsqlite3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-torch python3-torchvision python3-numpy
  python3-grpcio python3-grpc-tools python3-protobuf prometheus curl openssl iproute2
  clang
  dataset-fashion-mnist
)

momentum_missing_packages() {
  local pkg
  for pkg in "${MOMENTUM_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      echo "$pkg"
    fi
  done
}

momentum_install_packages() {
  local missing
  missing=$(momentum_missing_packages)
  [ -z "$missing" ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: $missing" >&2; return 1; }
    sudo=sudo
  fi
  echo "setup: installing $(echo $missing | tr '\n' ' ')"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# Configures and builds the tree in build/ (or $MOMENTUM_BUILD_DIR). Extra
# arguments are build targets.
momentum_build() {
  local root build
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  build=${MOMENTUM_BUILD_DIR:-$root/build}
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  # Two jobs: a LibTorch translation unit takes about 1.5 GB to compile.
  cmake --build "$build" -j "${MOMENTUM_JOBS:-$(nproc)}" "${targets[@]}"
}
