# momentum-worker-cpu: momentum-agent and momentum-worker on Debian's
# LibTorch (CPU; ranks form Gloo process groups). Build from the repository
# root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile \
#     -t ghcr.io/momentum-ml/momentum-worker-cpu:0.1.0 .
ARG DEBIAN_IMAGE=debian:12.11-slim

FROM ${DEBIAN_IMAGE} AS build
COPY scripts/setup.sh /src/scripts/setup.sh
RUN bash /src/scripts/setup.sh --role worker-cpu --build --clean
COPY . /src
# A LibTorch translation unit takes about 1.5 GB to compile.
ARG BUILD_JOBS=4
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOMENTUM_BUILD_TESTS=OFF -DMOMENTUM_BUILD_BENCH=OFF \
 && cmake --build /build -j "${BUILD_JOBS}" --target momentum-agent momentum-worker \
 && strip /build/server/momentum-agent /build/worker/momentum-worker

FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="momentum-worker-cpu" \
      org.opencontainers.image.description="Momentum node agent (momentum-agent) and trainer (momentum-worker), Debian LibTorch on CPU with Gloo" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="momentum-ml" \
      org.opencontainers.image.base.name="docker.io/library/${DEBIAN_IMAGE}"
# libopenblas0-openmp: LibTorch's BLAS through the OpenMP OpenBLAS, which
# the trainer's thread settings assume.
COPY scripts/setup.sh /tmp/setup.sh
RUN bash /tmp/setup.sh --role worker-cpu --runtime --clean && rm /tmp/setup.sh \
 && groupadd --gid 10001 momentum \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/momentum --no-create-home \
      --shell /usr/sbin/nologin momentum \
 && mkdir -p /var/lib/momentum /data /outputs \
 && chown 10001:10001 /var/lib/momentum /outputs
COPY --from=build /build/server/momentum-agent /build/worker/momentum-worker /usr/local/bin/
RUN ! ldd /usr/local/bin/momentum-agent /usr/local/bin/momentum-worker | grep 'not found'
ENV HOME=/var/lib/momentum
WORKDIR /var/lib/momentum
USER 10001:10001
# 8081 gRPC health. The ranks' c10d ports (TCPStore, Gloo) are picked at
# launch and need no EXPOSE (pod-to-pod).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/momentum-agent"]
