# momentum-coordinator: momentum-server and the momentum client, without
# LibTorch (built with -DMOMENTUM_BUILD_WORKER=OFF). Build from the
# repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile \
#     -t ghcr.io/momentum-ml/momentum-coordinator:0.1.0 .
# Debian 12 point release pinned: the package names in scripts/setup.sh are
# Debian 12's, and the build and runtime stages must agree on their versions.
ARG DEBIAN_IMAGE=debian:12.11-slim

FROM ${DEBIAN_IMAGE} AS build
# Packages first, so that a source change does not reinstall them.
COPY scripts/setup.sh /src/scripts/setup.sh
RUN bash /src/scripts/setup.sh --role coordinator --build --clean
COPY . /src
ARG BUILD_JOBS=4
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOMENTUM_BUILD_WORKER=OFF -DMOMENTUM_BUILD_TESTS=OFF -DMOMENTUM_BUILD_BENCH=OFF \
 && cmake --build /build -j "${BUILD_JOBS}" --target momentum-server momentum_cli \
 && strip /build/server/momentum-server /build/client/momentum

FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="momentum-coordinator" \
      org.opencontainers.image.description="Momentum coordinator (momentum-server) and client (momentum); no LibTorch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="momentum-ml" \
      org.opencontainers.image.base.name="docker.io/library/${DEBIAN_IMAGE}"
COPY scripts/setup.sh /tmp/setup.sh
RUN bash /tmp/setup.sh --role coordinator --runtime --clean && rm /tmp/setup.sh \
 && groupadd --gid 10001 momentum \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/momentum --no-create-home \
      --shell /usr/sbin/nologin momentum \
 && mkdir -p /var/lib/momentum /data /outputs \
 && chown 10001:10001 /var/lib/momentum /outputs
COPY --from=build /build/server/momentum-server /build/client/momentum /usr/local/bin/
# Fails the build when a library is missing or LibTorch crept in.
RUN ! ldd /usr/local/bin/momentum-server /usr/local/bin/momentum | grep -E 'not found|libtorch|libc10'
ENV HOME=/var/lib/momentum
WORKDIR /var/lib/momentum
USER 10001:10001
# 50051 gRPC API (TLS off loopback), 9464 /metrics, 8081 gRPC health.
EXPOSE 50051 9464 8081
ENTRYPOINT ["/usr/local/bin/momentum-server"]
