#!/usr/bin/env bash
# Builds the server and the client with clang, -Wthread-safety as errors
# (the locks' ABSL_GUARDED_BY and ABSL_EXCLUSIVE_LOCKS_REQUIRED contracts)
# and MOMENTUM_BUILD_WORKER=OFF (no LibTorch), then runs their unit tests
# there.
#   tests/server/thread_safety_build.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
src=$1 build=$2
launcher=()
if command -v ccache > /dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER=clang++ -DMOMENTUM_BUILD_WORKER=OFF \
  -DCMAKE_CXX_FLAGS="-Wthread-safety -Werror=thread-safety" \
  "${launcher[@]}" > "$build.configure.log" 2>&1 ||
  { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)"
# The unit tests of what was built (the end-to-end ones run in the main
# build).
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" \
  -R '^(job_spec_test|status_macros_test|job_store_test|server_metrics_test|gpus_test|coordinator_test|coordinator_units_test|client_format_test|client_watch_printer_test)$'
