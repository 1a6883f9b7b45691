# momentum-worker-cpu: momentum-agent and momentum-worker on the LibTorch of
# PyPI's torch 2.11.0 (scripts/python-requirements.txt), built for CPU
# (-DMOMENTUM_WITH_CUDA=OFF; ranks form Gloo process groups). Build from the
# repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile \
#     -t ghcr.io/momentum-ml/momentum-worker-cpu:0.1.0 .
ARG DEBIAN_IMAGE=debian:12.11-slim

FROM ${DEBIAN_IMAGE} AS build
# setup.sh makes the project's virtual environment (torch 2.11.0 and the
# rest of scripts/python-requirements.txt, each at its exact version, from
# PyPI) at MOMENTUM_VENV; the worker builds on the LibTorch inside it. No pip
# cache: the wheels (several GB) would only double the layer.
ENV MOMENTUM_VENV=/opt/momentum/venv \
    PIP_NO_CACHE_DIR=1
# Packages and the venv first, so that a source change does not reinstall
# them; setup.sh reads the requirements next to itself.
COPY scripts/setup.sh scripts/python-requirements.txt /src/scripts/
RUN bash /src/scripts/setup.sh --role worker-cpu --build --clean
COPY . /src
# A LibTorch translation unit takes about 1.5 GB to compile.
ARG BUILD_JOBS=4
# Then the libraries the binaries load from the venv: libtorch_cpu and
# libc10, which a CPU build links, and what ldd shows they load from it: the
# OpenMP runtime in torch/lib, and the CUDA runtime and CUPTI, which
# libtorch_cpu links even where no GPU is used (nvidia-cuda-runtime,
# nvidia-cuda-cupti; tests/deploy/images/check_images.py checks the list). They keep the venv's layout under
# /opt/momentum/site-packages, so the wheels' own run paths
# ($ORIGIN, $ORIGIN/../../nvidia/cu13/lib) still find each other; the runtime
# stage takes only these, not the 5 GB venv.
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOMENTUM_PYTHON=${MOMENTUM_VENV}/bin/python -DMOMENTUM_WITH_CUDA=OFF \
      -DMOMENTUM_BUILD_TESTS=OFF -DMOMENTUM_BUILD_BENCH=OFF \
 && cmake --build /build -j "${BUILD_JOBS}" --target momentum-agent momentum-worker \
 && strip /build/server/momentum-agent /build/worker/momentum-worker \
 && cd "$("${MOMENTUM_VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && mkdir -p /opt/momentum/site-packages \
 && cp -L --parents \
      torch/lib/libtorch_cpu.so torch/lib/libc10.so torch/lib/libgomp.so.1 \
      nvidia/cu13/lib/libcudart.so.13 nvidia/cu13/lib/libcupti.so.13 \
      /opt/momentum/site-packages/

FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="momentum-worker-cpu" \
      org.opencontainers.image.description="Momentum node agent (momentum-agent) and trainer (momentum-worker), LibTorch 2.11.0 (PyPI torch) on CPU with Gloo" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="momentum-ml" \
      org.opencontainers.image.base.name="docker.io/library/${DEBIAN_IMAGE}"
COPY scripts/setup.sh /tmp/setup.sh
RUN bash /tmp/setup.sh --role worker-cpu --runtime --clean && rm /tmp/setup.sh \
 && groupadd --gid 10001 momentum \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/momentum --no-create-home \
      --shell /usr/sbin/nologin momentum \
 && mkdir -p /var/lib/momentum /data /outputs \
 && chown 10001:10001 /var/lib/momentum /outputs
# LibTorch's libraries (about 460 MB) from the build stage's venv.
COPY --from=build /opt/momentum/site-packages /opt/momentum/site-packages
COPY --from=build /build/server/momentum-agent /build/worker/momentum-worker /usr/local/bin/
# The binaries' own run path names the build stage's venv, which is not
# here: the dynamic loader finds LibTorch through ld.so.conf.d. Fails the
# build when a library is missing.
RUN printf '%s\n' /opt/momentum/site-packages/torch/lib /opt/momentum/site-packages/nvidia/cu13/lib \
      > /etc/ld.so.conf.d/momentum-torch.conf \
 && ldconfig \
 && ! ldd /usr/local/bin/momentum-agent /usr/local/bin/momentum-worker | grep 'not found'
ENV HOME=/var/lib/momentum
WORKDIR /var/lib/momentum
USER 10001:10001
# 8081 gRPC health. The ranks' c10d ports (TCPStore, Gloo) are picked at
# launch and need no EXPOSE (pod-to-pod).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/momentum-agent"]
