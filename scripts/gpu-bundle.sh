#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has torch
# 2.11.0+cu130 for Python 3.12 but no C++ development packages and no
# network, into gpu-bundle/ (git-ignored; the device tool carries it:
# `carry: ["gpu-bundle"]`, 64 MiB at most with the tree):
#   binaries.tar.xz  the binaries built here with CUDA (tests that run on a
#                    GPU, the bench, the worker, server and client) and the
#                    Debian shared libraries they load that such a machine
#                    lacks;
#   data/            the Fashion-MNIST files of the demo;
#   wheels/          torchvision and Pillow for Python 3.12, from PyPI at the
#                    versions of scripts/python-requirements.txt, which the
#                    official MoCo baseline needs if that machine lacks them.
# LibTorch, CUDA and NCCL are not packed: the machine's torch wheel has them.
#   scripts/gpu-bundle.sh            build what is missing, then pack
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
momentum_install_packages
momentum_python_env
build=${MOMENTUM_BUILD_DIR:-build}
binaries=(tests/process_group_test tests/moco_test tests/moco_dist_test
  tests/trainer_test tests/device_augment_test bench/trainer_bench worker/momentum-worker
  server/momentum-server client/momentum)
targets=()
for b in "${binaries[@]}"; do targets+=("$(basename "$b")"); done
momentum_build "${targets[@]}"
ldd "$build/worker/momentum-worker" | grep -q libtorch_cuda || {
  echo "gpu-bundle: $build/worker/momentum-worker is not a CUDA build" \
    "(MOMENTUM_WITH_CUDA; is a CUDA toolkit installed?)" >&2
  exit 1
}
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/data/fashion-mnist"
for b in "${binaries[@]}"; do
  strip -o "$out/bin/$(basename "$b")" "$build/$b"
done
# Every library ldd resolves outside the venv (torch and nvidia come from
# the GPU machine's wheel), except glibc's own, the C++ runtime, OpenSSL 3
# and zlib, which that machine has (its Python needs them) in newer
# versions of the same ABI.
skip='^(libc|libm|libdl|librt|libpthread|libutil|ld-linux-x86-64|libstdc\+\+|libgcc_s|libssl|libcrypto|libz)\.so'
for b in "$out"/bin/*; do
  ldd "$build/$(printf '%s\n' "${binaries[@]}" | grep "/$(basename "$b")$")" |
    awk '$3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  case "$lib" in */.venv/* | */site-packages/* | */venv-*) continue ;; esac
  name=$(basename "$lib")
  [[ "$name" =~ $skip ]] && continue
  strip -o "$out/lib/$name" "$(readlink -f "$lib")"
done
cp /usr/share/datasets/fashion-mnist/*.gz "$out/data/fashion-mnist/"
tar -cJf "$out/binaries.tar.xz" -C "$out" bin lib
rm -rf "$out/bin" "$out/lib"
python=${MOMENTUM_VENV:-.venv}/bin/python
pin() { grep -i "^$1==" scripts/python-requirements.txt | head -1; }
"$python" -m pip download --quiet --only-binary=:all: --no-deps \
  --python-version 3.12 --platform manylinux_2_28_x86_64 \
  -d "$out/wheels" "$(pin torchvision)" "$(pin pillow)"
du -sh "$out"
size=$(du -sb "$out" | cut -f1)
# The device tool carries 64 MiB in all, the tracked tree (2 MB) included.
if [ "$size" -gt $((60 << 20)) ]; then
  echo "gpu-bundle: $size bytes, over the 60 MiB this bundle may take" >&2
  exit 1
fi
