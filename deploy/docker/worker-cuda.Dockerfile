# momentum-worker-cuda: momentum-agent and momentum-worker built with
# -DMOMENTUM_WITH_CUDA=ON on the LibTorch C++ distribution for CUDA 12.4
# (CUDA tensors, NCCL process groups). Debian has no CUDA LibTorch nor NCCL,
# so the toolkit comes from NVIDIA's CUDA image and LibTorch from PyTorch's
# zip, checked against its SHA-256; everything else is Debian 12's, as in the
# other images. Build from the repository root:
#   docker build -f deploy/docker/worker-cuda.Dockerfile \
#     --build-arg LIBTORCH_SHA256=<sha256 of the zip> \
#     -t ghcr.io/momentum-ml/momentum-worker-cuda:0.1.0 .
# Run with the NVIDIA container runtime (it mounts the driver's libcuda).
ARG DEBIAN_IMAGE=debian:12.11-slim
# The toolkit LibTorch 2.4.1+cu124 was built with. Ubuntu 22.04's glibc
# (2.35) is older than Debian 12's (2.36), so its nvcc and libraries run
# there; CUDA 12.4 accepts Debian's GCC 12 as host compiler.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04

FROM ${CUDA_IMAGE} AS cuda

FROM ${DEBIAN_IMAGE} AS build
COPY scripts/setup.sh /src/scripts/setup.sh
RUN bash /src/scripts/setup.sh --role worker-cuda --build --clean
COPY --from=cuda /usr/local/cuda-12.4 /usr/local/cuda-12.4
# NCCL, for a LibTorch that loads it rather than linking it in.
COPY --from=cuda /usr/lib/x86_64-linux-gnu/libnccl.so* /opt/nccl/lib/
ARG LIBTORCH_VERSION=2.4.1
ARG LIBTORCH_CUDA=cu124
# No default: the digest is recorded where the image is released (see
# deploy/docker/README.md), and the build refuses an unchecked download.
ARG LIBTORCH_SHA256
RUN ln -s cuda-12.4 /usr/local/cuda \
 && test -n "${LIBTORCH_SHA256}" \
    || { echo "worker-cuda.Dockerfile: --build-arg LIBTORCH_SHA256 is required (sha256 of libtorch-cxx11-abi-shared-with-deps-${LIBTORCH_VERSION}+${LIBTORCH_CUDA}.zip)" >&2; exit 1; } \
 && curl -fsSL -o /tmp/libtorch.zip \
      "https://download.pytorch.org/libtorch/${LIBTORCH_CUDA}/libtorch-cxx11-abi-shared-with-deps-${LIBTORCH_VERSION}%2B${LIBTORCH_CUDA}.zip" \
 && echo "${LIBTORCH_SHA256}  /tmp/libtorch.zip" | sha256sum -c - \
 && unzip -q /tmp/libtorch.zip -d /opt \
 && rm /tmp/libtorch.zip \
 && find /opt/libtorch/lib -name '*.a' -delete \
 && printf '%s\n' /opt/libtorch/lib /usr/local/cuda/lib64 /opt/nccl/lib > /etc/ld.so.conf.d/momentum.conf \
 && ldconfig
ENV PATH=/usr/local/cuda/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda
COPY . /src
ARG BUILD_JOBS=4
# Collects the CUDA libraries the binaries load from outside LibTorch's lib/
# (e.g. the cudart the toolkit's CMake targets link), for the runtime stage.
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOMENTUM_WITH_CUDA=ON -DTorch_DIR=/opt/libtorch/share/cmake/Torch \
      -DCUDAToolkit_ROOT=/usr/local/cuda \
      -DMOMENTUM_BUILD_TESTS=OFF -DMOMENTUM_BUILD_BENCH=OFF \
 && cmake --build /build -j "${BUILD_JOBS}" --target momentum-agent momentum-worker \
 && strip /build/server/momentum-agent /build/worker/momentum-worker \
 && mkdir -p /opt/cuda-runtime \
 && ldd /build/worker/momentum-worker \
    | awk '$3 ~ "^(/usr/local/cuda|/opt/nccl)" {print $3}' | sort -u \
    | xargs -r cp -L -t /opt/cuda-runtime

FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG LIBTORCH_VERSION=2.4.1
ARG LIBTORCH_CUDA=cu124
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="momentum-worker-cuda" \
      org.opencontainers.image.description="Momentum node agent (momentum-agent) and trainer (momentum-worker), LibTorch ${LIBTORCH_VERSION}+${LIBTORCH_CUDA} with NCCL" \
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
# LibTorch's shared libraries (with the cuDNN, cuBLAS and CUDA runtime it
# bundles) and the toolkit's libraries collected above.
COPY --from=build /opt/libtorch/lib /opt/libtorch/lib
COPY --from=build /opt/cuda-runtime /opt/cuda-runtime
COPY --from=build /build/server/momentum-agent /build/worker/momentum-worker /usr/local/bin/
# libcuda.so.1 is the driver's: the NVIDIA container runtime mounts it.
RUN printf '%s\n' /opt/libtorch/lib /opt/cuda-runtime > /etc/ld.so.conf.d/momentum.conf \
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
