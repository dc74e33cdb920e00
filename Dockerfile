# The switchyard image for Kubernetes (docs/kubernetes.md). Two stages: a
# Rust build with OpenMPI (the cpu-mpi overlay runs mpirun in the worker
# pod), then a Debian slim runtime with the binary and OpenMPI's runtime.
# Not built in CI: this project's machines have no container runtime.
#   docker build -t registry.example.com/switchyard:0.1.0 .
# FEATURES: "mpi" (default); add ",cuda" for the GPU switch (the NCCL
# backend is still a stub that says so at start).
ARG FEATURES=mpi

FROM rust:1.85-bookworm AS build
ARG FEATURES
RUN apt-get update \
 && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p launcher --features "${FEATURES}" \
 && cp target/release/switchyard /usr/local/bin/switchyard

FROM debian:bookworm-slim
# ca-certificates: HTTPS to the object store; openmpi-bin: mpirun and libmpi.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openmpi-bin \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
WORKDIR /var/lib/switchyard
ENTRYPOINT []
CMD ["switchyard", "--help"]
