#!/usr/bin/env bash
# What momentum-worker loads, as the dynamic linker resolves it (ldd):
# LibTorch from the project's torch 2.11.0 (its torch/lib folder), never a
# system LibTorch; in a CUDA build (MOMENTUM_WITH_CUDA resolved ON)
# libtorch_cuda, libc10_cuda and NCCL as well, and in a CPU build none of
# them (the CUDA runtime loads in both: the wheel's libtorch_cpu links it);
# never Debian's libgloo (Gloo's code runs inside libtorch_cpu). Every
# library resolves, and the binary starts (--help) on a machine without a
# GPU.
#   linkage_test.sh WORKER TORCH_DIR CUDA   (CUDA: ON or OFF)
set -uo pipefail
worker=$1 torch_dir=$(realpath "$2") cuda=$3
passed=0 failed=0
check() {  # NAME CONDITION-EXIT-CODE [DETAIL]
  if [ "$2" = 0 ]; then
    passed=$((passed + 1)); echo "ok   $1"
  else
    failed=$((failed + 1)); echo "FAIL $1${3:+: $3}"
  fi
}
libs=$(ldd "$worker" 2>&1)
# The path a library resolved to, or nothing.
resolved() { awk -v lib="$1" '$1 == lib && $3 ~ /^\// {print $3}' <<<"$libs" | head -1; }
same_file() { [ -n "$1" ] && [ "$(realpath "$1")" = "$(realpath "$2")" ]; }

missing=$(grep 'not found' <<<"$libs")
check "every library resolves" "$([ -z "$missing" ]; echo $?)" "$missing"
for lib in libtorch_cpu.so libc10.so; do
  path=$(resolved "$lib")
  same_file "$path" "$torch_dir/lib/$lib"
  check "$lib comes from $torch_dir/lib" $? "resolved to '${path:-nothing}'"
done
system=$(grep -E '/usr/lib[^ ]*/lib(torch|c10)[^ ]*\.so' <<<"$libs")
check "no system LibTorch" "$([ -z "$system" ]; echo $?)" "$system"
gloo=$(grep -E 'libgloo' <<<"$libs")
check "no libgloo (Gloo runs inside libtorch_cpu)" "$([ -z "$gloo" ]; echo $?)" "$gloo"
if [ "$cuda" = ON ]; then
  for lib in libtorch_cuda.so libc10_cuda.so; do
    path=$(resolved "$lib")
    same_file "$path" "$torch_dir/lib/$lib"
    check "CUDA build loads $lib from $torch_dir/lib" $? "resolved to '${path:-nothing}'"
  done
  for lib in libnccl.so.2 libcudart.so.13; do
    path=$(resolved "$lib")
    check "CUDA build loads $lib" "$([ -n "$path" ]; echo $?)" "not in ldd's list"
  done
  nccl=$(resolved libnccl.so.2)
  case $nccl in
    */nvidia/nccl/lib/*) r=0 ;;
    *) r=1 ;;
  esac
  check "NCCL is nvidia-nccl-cu13's, next to torch" $r "resolved to '${nccl:-nothing}'"
else
  # The wheel's libtorch_cpu itself links the CUDA runtime and CUPTI (from
  # nvidia-cuda-runtime and nvidia-cuda-cupti), so those load in any build.
  cudalibs=$(grep -E 'libtorch_cuda|libc10_cuda|libnccl' <<<"$libs")
  check "CPU build loads neither libtorch_cuda nor NCCL" "$([ -z "$cudalibs" ]; echo $?)" "$cudalibs"
fi
# The wheel's libtorch.so and libtorch_cpu.so export unversioned copies of
# parts of libstdc++ (std::filesystem); listed before libstdc++.so.6 they
# take the binary's own calls, and remove_all crashes (cmake/MomentumTorch.cmake).
needed=$(readelf -d "$worker" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
stdcxx=$(grep -n -m1 '^libstdc++\.so' <<<"$needed" | cut -d: -f1)
torch=$(grep -n -m1 '^libtorch' <<<"$needed" | cut -d: -f1)
check "libstdc++.so.6 is needed before LibTorch" \
  "$([ -n "$stdcxx" ] && [ -n "$torch" ] && [ "$stdcxx" -lt "$torch" ]; echo $?)" \
  "NEEDED order: $(tr '\n' ' ' <<<"$needed")"
out=$("$worker" --help 2>&1)
check "momentum-worker --help runs (no GPU here)" $? "$(head -5 <<<"$out")"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
