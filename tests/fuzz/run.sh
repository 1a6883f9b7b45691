#!/usr/bin/env bash
# Builds a libFuzzer target with clang (AddressSanitizer, UndefinedBehavior-
# Sanitizer, LeakSanitizer) and runs it for a bounded time from its seed
# corpus in tests/fuzz/corpus/<target>; any crash, leak or sanitizer report
# fails the run.
#   tests/fuzz/run.sh BUILD_DIR TARGET SECONDS   (SECONDS > 0)
# TARGET is one of the names in the case below; its harness is
# tests/fuzz/TARGET_fuzz.cc (png and jpeg share image_fuzz.cc). Every source
# is compiled with the sanitizers into BUILD_DIR/fuzz/obj, once: an object
# is rebuilt only when its source or a header it includes changed, so
# targets that share sources (the coordinator's, the protos) compile them
# once per build directory. `checkpoint` instruments checkpoint.cc and
# moco.cc and links the rest of the trainer from the build's own
# (uninstrumented) libmomentum_trainer.a and LibTorch, so it needs a build
# with the worker. Crashes are written to BUILD_DIR/fuzz.
set -euo pipefail
build=$(cd "$1" && pwd) target=$2 seconds=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$build/fuzz
proto=$build/proto/momentum/v1
mkdir -p "$out/obj"
# shellcheck disable=SC2054  # the commas are clang's
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer-no-link,address,undefined
       -fno-sanitize-recover=undefined -I"$root" -I"$build/proto")
absl=(absl_status absl_statusor absl_strings absl_str_format)
max_len=4096
coordinator=(server/coordinator.cc server/admission.cc server/agent_launcher.cc
             server/clock.cc server/gang_health.cc server/gpus.cc
             server/internal_dispatch.cc server/job_logs.cc server/job_store.cc
             server/job_view.cc server/placement.cc server/server_metrics.cc
             server/watch_hub.cc server/log_rate.cc server/request_limits.cc
             server/rank_credentials.cc server/local_launcher.cc
             common/job_spec.cc common/file_util.cc
             common/job_progress.cc common/process.cc common/utf8.cc
             common/grpc_security.cc
             "$proto/jobs.pb.cc" "$proto/internal.pb.cc")
coordinator_pkgs=(grpc++ protobuf sqlite3 yaml-cpp prometheus-cpp-pull
                  prometheus-cpp-core absl_synchronization absl_time)
pre_libs=() extra_libs=()
case $target in
  job_spec)
    srcs=(common/job_spec.cc common/file_util.cc) pkgs=(yaml-cpp) ;;
  submit)
    srcs=(common/job_spec.cc common/file_util.cc "$proto/jobs.pb.cc")
    pkgs=(yaml-cpp protobuf) ;;
  agent_messages | worker_reports)
    srcs=("${coordinator[@]}") pkgs=("${coordinator_pkgs[@]}") ;;
  token_file)
    srcs=(common/grpc_security.cc common/file_util.cc) pkgs=(grpc++) ;;
  path_confinement)
    srcs=(server/admission.cc common/job_spec.cc common/file_util.cc)
    pkgs=(yaml-cpp) ;;
  idx)
    srcs=(worker/fashion_mnist.cc worker/image_folder.cc common/job_spec.cc
          common/file_util.cc)
    pkgs=(yaml-cpp zlib libpng libjpeg) ;;
  png | jpeg)
    srcs=(worker/image_folder.cc common/job_spec.cc common/file_util.cc)
    pkgs=(yaml-cpp libpng libjpeg) max_len=16384 ;;
  checkpoint)
    # LibTorch of the build's Python (MOMENTUM_PYTHON), as cmake/ finds it.
    python=$(sed -n 's/^MOMENTUM_PYTHON:[A-Z]*=//p' "$build/CMakeCache.txt")
    torch=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
    flags+=(-D_GLIBCXX_USE_CXX11_ABI=1 -isystem "$torch/include"
            -isystem "$torch/include/torch/csrc/api/include")
    srcs=(worker/checkpoint.cc worker/moco.cc common/job_spec.cc
          common/file_util.cc)
    pkgs=(yaml-cpp spdlog zlib libpng libjpeg absl_synchronization)
    # LibTorch carries copies of libstdc++'s std::filesystem that crash
    # when called from our code: libstdc++ first, as cmake/MomentumTorch.cmake
    # links it.
    # shellcheck disable=SC2054  # the commas are the linker's
    pre_libs=(-Wl,--push-state,--no-as-needed,-lstdc++,--pop-state)
    # shellcheck disable=SC2054
    extra_libs=("$build/worker/libmomentum_trainer.a"
                "$build/worker/libmomentum_log.a"
                -L"$torch/lib" -Wl,-rpath,"$torch/lib" -ltorch -ltorch_cpu -lc10
                -lfmt -pthread
                # The trainer's fused BatchNorm is OpenMP, on LibTorch's runtime.
                -l:libgomp.so.1)
    # A trainer built with CUDA refers to LibTorch's CUDA libraries too.
    if [[ -f $torch/lib/libtorch_cuda.so ]]; then
      extra_libs+=(-ltorch_cuda -lc10_cuda)
    fi
    # What LibTorch leaks on corrupt archives (see the file).
    export LSAN_OPTIONS=suppressions=$here/checkpoint_lsan.supp:print_suppressions=0
    max_len=131072 ;;
  client_render)
    srcs=(client/format.cc client/watch_printer.cc common/job_progress.cc
          common/utf8.cc
          "$proto/jobs.pb.cc")
    pkgs=(protobuf absl_time) ;;
  *) echo "run.sh: unknown target $target" >&2; exit 2 ;;
esac
case $target in png | jpeg) main=image ;; *) main=$target ;; esac
srcs=("$here/${main}_fuzz.cc" "${srcs[@]}")

# Whether object $1 is missing or older than a file its .d file names.
stale() {
  local obj=$1 dep=${1%.o}.d f
  [[ -f $obj && -f $dep ]] || return 0
  # shellcheck disable=SC2013  # a .d file's paths have no spaces here
  for f in $(sed -e 's/^[^:]*://' -e 's/\\$//' "$dep"); do
    [[ $f -nt $obj ]] && return 0
  done
  return 1
}
objs=()
for src in "${srcs[@]}"; do
  [[ $src = /* ]] || src=$root/$src
  key=$(printf '%s\n' "$src" "${flags[@]}" | md5sum | cut -c1-12)
  obj=$out/obj/$(basename "$src" .cc)-$key.o
  if stale "$obj"; then
    echo "run.sh: compiling $src" >&2
    # Beside the object first, then renamed: runs in parallel share objects.
    clang++ "${flags[@]}" -MMD -MF "$obj.$$.d" -c "$src" -o "$obj.$$"
    mv "$obj.$$.d" "${obj%.o}.d"
    mv "$obj.$$" "$obj"
  fi
  objs+=("$obj")
done
binary=$out/${target}_fuzz
# shellcheck disable=SC2046
clang++ -fsanitize=fuzzer,address,undefined "${pre_libs[@]}" "${objs[@]}" \
  -o "$binary" \
  "${extra_libs[@]}" $(pkg-config --libs "${absl[@]}" "${pkgs[@]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/corpus/$target"/* "$work/"
cd "$out"
"$binary" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 \
  -print_final_stats=1 "$work"
