# momentum-worker-cuda: momentum-agent and momentum-worker built with
# -DMOMENTUM_WITH_CUDA=ON on the LibTorch of PyPI's torch 2.11.0 (built with
# CUDA 13.0; scripts/python-requirements.txt), with CUDA tensors and NCCL
# process groups. LibTorch, the CUDA libraries it loads (cuBLAS, cuDNN,
# NCCL 2.28.9, NVSHMEM, ...) come from the same pinned PyPI packages as on a
# developer's machine; the CUDA toolkit the build needs (nvcc, headers) from
# NVIDIA's CUDA image; everything else from Debian 12, as in the other
# images. Build from the repository root:
#   docker build -f deploy/docker/worker-cuda.Dockerfile \
#     -t ghcr.io/momentum-ml/momentum-worker-cuda:0.1.0 .
# Run with the NVIDIA container runtime (it mounts the driver's libcuda).
ARG DEBIAN_IMAGE=debian:12.11-slim
# CUDA 13.0 Update 2: the toolkit whose components the wheels pin
# (cuda-toolkit 13.0.2 in scripts/python-requirements.txt: cudart 13.0.96,
# NVRTC 13.0.88, cuBLAS 13.1.0.3). Ubuntu 22.04's glibc (2.35) is not newer
# than Debian 12's (2.36), so its nvcc and libraries run there (the
# ubuntu24.04 variant needs 2.39); CUDA 13.0 accepts Debian's GCC 12 as host
# compiler.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu22.04

FROM ${CUDA_IMAGE} AS cuda

FROM ${DEBIAN_IMAGE} AS build
# The virtual environment with torch 2.11.0 and its nvidia-* packages, each
# at its exact version from PyPI (setup.sh makes it at MOMENTUM_VENV). No pip
# cache: the wheels (several GB) would only double the layer.
ENV MOMENTUM_VENV=/opt/momentum/venv \
    PIP_NO_CACHE_DIR=1
COPY scripts/setup.sh scripts/python-requirements.txt /src/scripts/
RUN bash /src/scripts/setup.sh --role worker-cuda --build --clean
# Only the toolkit: NCCL and cuDNN are the venv's (nvidia-nccl-cu13,
# nvidia-cudnn-cu13), the ones torch was built and tested with.
COPY --from=cuda /usr/local/cuda-13.0 /usr/local/cuda-13.0
RUN ln -s cuda-13.0 /usr/local/cuda
ENV PATH=/usr/local/cuda/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda
COPY . /src
ARG BUILD_JOBS=4
# Then, for the runtime stage, the venv's library folders in its layout
# under /opt/momentum/site-packages (so the wheels' run paths,
# $ORIGIN/../../nvidia/*/lib, still find each other): torch/lib and the
# nvidia/*/lib folders libtorch_cuda loads from, whole, since cuDNN, NVRTC,
# NVSHMEM and torch open more of their own libraries when first used
# (cuDNN's engines, libtorch_cuda_linalg, NVSHMEM's bootstrap plugins). And
# the toolkit libraries the binaries load (ldd) that the venv lacks under the
# same name: none with this toolkit, as LibTorch's CMake targets name only the
# CUDA runtime and NVRTC, which the venv has too (and the linker drops them
# as unneeded on a build checked by tests/deploy/images/check_images.py).
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOMENTUM_PYTHON=${MOMENTUM_VENV}/bin/python -DMOMENTUM_WITH_CUDA=ON \
      -DCUDAToolkit_ROOT=/usr/local/cuda \
      -DMOMENTUM_BUILD_TESTS=OFF -DMOMENTUM_BUILD_BENCH=OFF \
 && cmake --build /build -j "${BUILD_JOBS}" --target momentum-agent momentum-worker \
 && strip /build/server/momentum-agent /build/worker/momentum-worker \
 && cd "$("${MOMENTUM_VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && mkdir -p /opt/momentum/site-packages /opt/cuda-runtime \
 && cp -a --parents \
      torch/lib nvidia/cu13/lib nvidia/cudnn/lib nvidia/cusparselt/lib nvidia/nccl/lib nvidia/nvshmem/lib \
      /opt/momentum/site-packages/ \
 && ldd /build/server/momentum-agent /build/worker/momentum-worker \
    | awk '$3 ~ "^/usr/local/cuda" && $3 !~ "/stubs/" {print $1, $3}' | sort -u \
    | while read -r name path; do \
        find /opt/momentum/site-packages -name "$name" | grep -q . || cp -L "$path" /opt/cuda-runtime/; \
      done

FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="momentum-worker-cuda" \
      org.opencontainers.image.description="Momentum node agent (momentum-agent) and trainer (momentum-worker), LibTorch 2.11.0 (PyPI torch, CUDA 13.0) with NCCL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="momentum-ml" \
      org.opencontainers.image.base.name="docker.io/library/${DEBIAN_IMAGE}"
COPY scripts/setup.sh /tmp/setup.sh
RUN bash /tmp/setup.sh --role worker-cuda --runtime --clean && rm /tmp/setup.sh \
 && groupadd --gid 10001 momentum \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/momentum --no-create-home \
      --shell /usr/sbin/nologin momentum \
 && mkdir -p /var/lib/momentum /data /outputs \
 && chown 10001:10001 /var/lib/momentum /outputs
# LibTorch and the CUDA libraries (about 3.8 GB) from the build stage's
# venv, and the toolkit libraries collected above.
COPY --from=build /opt/momentum/site-packages /opt/momentum/site-packages
COPY --from=build /opt/cuda-runtime /opt/cuda-runtime
COPY --from=build /build/server/momentum-agent /build/worker/momentum-worker /usr/local/bin/
# The venv's folders before the toolkit's, so that a library both have
# loads from the packages torch pins. libcuda.so.1 is the driver's: the
# NVIDIA container runtime mounts it. Fails the build when any other library
# is missing.
RUN printf '%s\n' \
      /opt/momentum/site-packages/torch/lib \
      /opt/momentum/site-packages/nvidia/cu13/lib \
      /opt/momentum/site-packages/nvidia/cudnn/lib \
      /opt/momentum/site-packages/nvidia/cusparselt/lib \
      /opt/momentum/site-packages/nvidia/nccl/lib \
      /opt/momentum/site-packages/nvidia/nvshmem/lib \
      /opt/cuda-runtime \
      > /etc/ld.so.conf.d/momentum-torch.conf \
 && ldconfig \
 && ! ldd /usr/local/bin/momentum-agent /usr/local/bin/momentum-worker \
      | grep 'not found' | grep -v -E 'libcuda\.so\.1|libnvidia-'
ENV HOME=/var/lib/momentum \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/momentum
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/momentum-agent"]
