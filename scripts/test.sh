#!/usr/bin/env bash
# Installs what is missing, builds everything and runs all tests (CTest:
# GoogleTest unit and integration tests and the Python cross-checks).
#   scripts/test.sh [ctest arguments, e.g. -R moco]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
momentum_install_packages
momentum_python_env
momentum_build
ctest --test-dir "${MOMENTUM_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" "$@"
