#!/usr/bin/env bash
# Installs the Debian 12 packages Momentum needs to build, test and run, when
# any is missing (quick when all are there), and the project's Python
# environment: LibTorch comes from PyPI's torch 2.11.0 (the version of our
# GPU machines) in the virtual environment .venv, pinned with everything else
# Python in scripts/python-requirements.txt. Runs as root, or through sudo
# when it is available.
#
# Sourced by test.sh and demo.sh, it installs everything:
#   source scripts/setup.sh; momentum_install_packages; momentum_python_env
#   momentum_build
# Run, it installs what one role needs; the container images
# (deploy/docker/) call it this way:
#   scripts/setup.sh --role ROLE (--build | --runtime) [--list] [--clean]
#   scripts/setup.sh --role test [--list]
# ROLE is coordinator (momentum-server, momentum; no LibTorch), worker-cpu
# (momentum-agent, momentum-worker on the virtual environment's LibTorch,
# Gloo), worker-cuda (the same with CUDA and NCCL, on an image that has the
# CUDA toolkit), test (what the tests and the demo use besides the build) or
# all (everything, as sourced). --build: compilers and headers, and for the
# worker roles the virtual environment; --runtime: the Debian shared
# libraries the binaries load (LibTorch's come from the virtual environment). --list prints
# the packages, one a line, and exits without installing; --clean empties
# apt's caches afterwards (for image layers).
set -euo pipefail

# Compilers, build tools and what every binary uses (job spec, API, CLI).
MOMENTUM_PKGS_BUILD_COMMON=(
  g++ cmake ninja-build pkg-config ccache git
  libabsl-dev libyaml-cpp-dev libcli11-dev nlohmann-json3-dev
  libgrpc++-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
)
# momentum-server and momentum-agent: the store and /metrics.
MOMENTUM_PKGS_BUILD_SERVER=(prometheus-cpp-dev libsqlite3-dev)
# momentum-worker besides LibTorch: logging, the image decoders, and Gloo's
# headers, which PyPI's torch does not ship although its ProcessGroupGloo.hpp
# includes them (for declarations only: every Gloo object it holds is behind
# a pointer; the Gloo code that runs is the one inside libtorch_cpu, and
# nothing links Debian's libgloo).
MOMENTUM_PKGS_BUILD_WORKER_BASE=(libspdlog-dev libjpeg62-turbo-dev libpng-dev zlib1g-dev libgloo-dev)
# The virtual environment that holds LibTorch (PyPI's torch) and the Python
# tools: Debian's Python 3.11 and its venv module.
MOMENTUM_PKGS_PYTHON=(python3 python3-venv)

# What the binaries load (what ldd resolves, by package; apt brings the
# rest as dependencies). libstdc++6, libgcc-s1 and libc6 are in every image.
MOMENTUM_PKGS_RUNTIME_COMMON=(
  libabsl20220623 libgrpc++1.51 libgrpc29 libprotobuf32 libre2-9 libc-ares2 libssl3
  libyaml-cpp0.7 zlib1g
)
MOMENTUM_PKGS_RUNTIME_SERVER=(libsqlite3-0 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0)
MOMENTUM_PKGS_RUNTIME_WORKER_BASE=(libspdlog1.10 libjpeg62-turbo libpng16-16 libgomp1)

# The tests, the fuzzers (clang with its sanitizer runtime), the demo's data
# set and the deploy checks (promtool, kubectl); the Python reference, the
# Python client and the schema checks live in the virtual environment.
MOMENTUM_PKGS_TEST=(
  libgtest-dev libgmock-dev libbenchmark-dev
  prometheus curl openssl iproute2
  clang libclang-rt-14-dev
  dataset-fashion-mnist
)
# Installed only when the command is missing, since it may come from
# elsewhere (kubectl from Kubernetes' own repository). Debian 12 has kubectl
# only as kubernetes-client.
MOMENTUM_TEST_COMMANDS=("kubectl:kubernetes-client")

# Everything, as test.sh and demo.sh need it.
MOMENTUM_PACKAGES=(
  "${MOMENTUM_PKGS_BUILD_COMMON[@]}" "${MOMENTUM_PKGS_BUILD_SERVER[@]}"
  "${MOMENTUM_PKGS_BUILD_WORKER_BASE[@]}" "${MOMENTUM_PKGS_PYTHON[@]}"
  "${MOMENTUM_PKGS_TEST[@]}"
)

# Prints the packages of ROLE (coordinator, worker-cpu, worker-cuda, test,
# all) for KIND (build or runtime), one a line; fails on an unknown one.
momentum_role_packages() {
  local role=$1 kind=${2:-build}
  case "$role:$kind" in
    coordinator:build) printf '%s\n' "${MOMENTUM_PKGS_BUILD_COMMON[@]}" "${MOMENTUM_PKGS_BUILD_SERVER[@]}" ;;
    coordinator:runtime) printf '%s\n' "${MOMENTUM_PKGS_RUNTIME_COMMON[@]}" "${MOMENTUM_PKGS_RUNTIME_SERVER[@]}" ;;
    worker-cpu:build)
      printf '%s\n' "${MOMENTUM_PKGS_BUILD_COMMON[@]}" "${MOMENTUM_PKGS_BUILD_SERVER[@]}" \
        "${MOMENTUM_PKGS_BUILD_WORKER_BASE[@]}" "${MOMENTUM_PKGS_PYTHON[@]}" ;;
    worker-cpu:runtime)
      printf '%s\n' "${MOMENTUM_PKGS_RUNTIME_COMMON[@]}" "${MOMENTUM_PKGS_RUNTIME_SERVER[@]}" \
        "${MOMENTUM_PKGS_RUNTIME_WORKER_BASE[@]}" ;;
    worker-cuda:build)
      printf '%s\n' "${MOMENTUM_PKGS_BUILD_COMMON[@]}" "${MOMENTUM_PKGS_BUILD_SERVER[@]}" \
        "${MOMENTUM_PKGS_BUILD_WORKER_BASE[@]}" "${MOMENTUM_PKGS_PYTHON[@]}" ;;
    worker-cuda:runtime)
      printf '%s\n' "${MOMENTUM_PKGS_RUNTIME_COMMON[@]}" "${MOMENTUM_PKGS_RUNTIME_SERVER[@]}" \
        "${MOMENTUM_PKGS_RUNTIME_WORKER_BASE[@]}" ;;
    test:build | test:runtime) momentum_test_packages ;;
    all:build | all:runtime) printf '%s\n' "${MOMENTUM_PACKAGES[@]}"; momentum_command_packages ;;
    *)
      echo "setup: unknown role '$role' for --$kind (roles: coordinator, worker-cpu, worker-cuda, test, all)" >&2
      return 2 ;;
  esac
}

# The packages of the commands in MOMENTUM_TEST_COMMANDS that are missing.
momentum_command_packages() {
  local entry
  for entry in "${MOMENTUM_TEST_COMMANDS[@]}"; do
    # shellcheck disable=SC2086 # the packages are a space-separated list
    command -v "${entry%%:*}" >/dev/null 2>&1 || printf '%s\n' ${entry#*:}
  done
}

momentum_test_packages() {
  printf '%s\n' "${MOMENTUM_PKGS_TEST[@]}"
  momentum_command_packages
}

# Prints those of the given packages (default: everything) that are not
# installed.
momentum_missing_packages() {
  local pkg pkgs=("$@")
  if [ $# -eq 0 ]; then
    mapfile -t pkgs < <(printf '%s\n' "${MOMENTUM_PACKAGES[@]}"; momentum_command_packages)
  fi
  for pkg in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      echo "$pkg"
    fi
  done
}

# Installs the given packages (default: everything) that are missing.
momentum_install_packages() {
  local missing
  missing=$(momentum_missing_packages "$@")
  [ -z "$missing" ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: $missing" >&2; return 1; }
    sudo=sudo
  fi
  echo "setup: installing $(tr '\n' ' ' <<<"$missing")"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# The project's Python environment: a virtual environment of Debian's
# python3 with exactly the packages of scripts/python-requirements.txt, at
# .venv in the source tree. It is made once per machine and list, in
# $MOMENTUM_CACHE_DIR (default ~/.cache/momentum) under a name that hashes the
# list and the Python version, and .venv links to it, so that every clone and
# CI run on one machine shares it; pip's own cache keeps the downloads. A
# venv whose install did not finish (no .momentum-complete) is made anew.
# MOMENTUM_VENV=DIR puts it in DIR instead. Prints how long an install took.
momentum_python_env() {
  local root req hash cache venv start
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  req=$root/scripts/python-requirements.txt
  if [ -n "${MOMENTUM_VENV:-}" ]; then
    venv=$MOMENTUM_VENV
  else
    hash=$({ grep -v '^#' "$req"; /usr/bin/python3 -c 'import sys; print(sys.version)'; } |
      sha256sum | cut -c1-16)
    cache=${MOMENTUM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/momentum}
    venv=$cache/venv-$hash
  fi
  mkdir -p "$(dirname "$venv")"
  (
    # One install at a time per venv, also across clones.
    flock 9
    if [ ! -f "$venv/.momentum-complete" ]; then
      start=$(date +%s)
      echo "setup: installing the Python environment (torch 2.11.0 with CUDA 13 libraries, about 5 GB) into $venv"
      rm -rf "$venv"
      /usr/bin/python3 -m venv "$venv"
      "$venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check -r "$req"
      "$venv/bin/python" -m pip check >/dev/null
      touch "$venv/.momentum-complete"
      echo "setup: Python environment installed in $(($(date +%s) - start)) s"
    fi
  ) 9>"$venv.lock"
  if [ -z "${MOMENTUM_VENV:-}" ] && [ "$(readlink "$root/.venv" 2>/dev/null)" != "$venv" ]; then
    if [ -e "$root/.venv" ] && [ ! -L "$root/.venv" ]; then
      echo "setup: $root/.venv exists and is not the link setup.sh makes; move it away, or set MOMENTUM_VENV=$root/.venv to install into it" >&2
      return 1
    fi
    ln -sfn "$venv" "$root/.venv"
  fi
}

# Configures and builds the tree in build/ (or $MOMENTUM_BUILD_DIR). Extra
# arguments are build targets.
momentum_build() {
  local root build
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  build=${MOMENTUM_BUILD_DIR:-$root/build}
  local python=${MOMENTUM_VENV:-$root/.venv}/bin/python
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DMOMENTUM_PYTHON="$python" >/dev/null
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  # Two jobs: a LibTorch translation unit takes about 1.5 GB to compile.
  cmake --build "$build" -j "${MOMENTUM_JOBS:-$(nproc)}" "${targets[@]}"
}

momentum_setup_usage() {
  cat <<'EOF'
usage: scripts/setup.sh --role ROLE (--build | --runtime) [--list] [--clean]
  ROLE: coordinator | worker-cpu | worker-cuda | test | all
  --build    packages to compile ROLE's binaries
  --runtime  shared libraries ROLE's binaries load
  --list     print the packages, one a line, and install nothing
  --clean    empty apt's caches after installing (container layers)
EOF
}

momentum_setup_main() {
  local role="" kind="" list=0 clean=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --role) [ $# -ge 2 ] || { echo "setup: --role needs a value" >&2; return 2; }; role=$2; shift 2 ;;
      --role=*) role=${1#--role=}; shift ;;
      --build | --runtime)
        [ -z "$kind" ] || { echo "setup: give one of --build and --runtime" >&2; return 2; }
        kind=${1#--}; shift ;;
      --list) list=1; shift ;;
      --clean) clean=1; shift ;;
      -h | --help) momentum_setup_usage; return 0 ;;
      *) echo "setup: unknown argument '$1'" >&2; momentum_setup_usage >&2; return 2 ;;
    esac
  done
  [ -n "$role" ] || { echo "setup: --role is required" >&2; momentum_setup_usage >&2; return 2; }
  case "$role" in
    test | all) kind=${kind:-build} ;;
    *) [ -n "$kind" ] || { echo "setup: role '$role' needs --build or --runtime" >&2; return 2; } ;;
  esac
  local pkgs
  pkgs=$(momentum_role_packages "$role" "$kind") || return 2
  if [ "$list" = 1 ]; then
    printf '%s\n' "$pkgs" | awk 'NF && !seen[$0]++'
    return 0
  fi
  # shellcheck disable=SC2086
  momentum_install_packages $pkgs
  # The worker builds on the virtual environment's LibTorch, and the tests
  # run its Python.
  case "$role:$kind" in
    worker-cpu:build | worker-cuda:build | test:* | all:*) momentum_python_env ;;
  esac
  if [ "$clean" = 1 ]; then
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  fi
}

# Run rather than sourced: install what the arguments name.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  momentum_setup_main "$@"
fi
