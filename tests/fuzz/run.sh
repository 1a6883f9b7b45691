#!/usr/bin/env bash
# Builds a libFuzzer target with clang (AddressSanitizer, UndefinedBehavior-
# Sanitizer, LeakSanitizer) and runs it for a bounded time from its seed
# corpus in tests/fuzz/corpus/<target>; any crash, leak or sanitizer report
# fails the run.
#   tests/fuzz/run.sh BUILD_DIR TARGET SECONDS   (TARGET: job_spec | submit)
set -euo pipefail
build=$(cd "$1" && pwd) target=$2 seconds=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$build/fuzz
mkdir -p "$out"
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -I"$root" -I"$build/proto")
libs=$(pkg-config --libs absl_status absl_statusor absl_strings absl_str_format yaml-cpp)
case $target in
  job_spec)
    srcs=("$here/job_spec_fuzz.cc" "$root/common/job_spec.cc"
          "$root/common/file_util.cc") ;;
  submit)
    srcs=("$here/submit_request_fuzz.cc" "$root/common/job_spec.cc"
          "$root/common/file_util.cc"
          "$build/proto/momentum/v1/jobs.pb.cc")
    libs="$libs $(pkg-config --libs protobuf)" ;;
  *) echo "run.sh: unknown target $target" >&2; exit 2 ;;
esac
binary=$out/${target}_fuzz
# shellcheck disable=SC2086
clang++ "${flags[@]}" "${srcs[@]}" -o "$binary" $libs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/corpus/$target"/* "$work/"
cd "$out"
"$binary" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
  -print_final_stats=1 "$work"
