# The switchyard image for Kubernetes (docs/kubernetes.md). Two stages: a
# Rust build with OpenMPI (the cpu-mpi overlay runs mpirun in the worker
# pod, the cpu-mpijob one over SSH between pods), then a Debian slim runtime
# with the binary, OpenMPI's runtime and OpenSSH, as a non-root user.
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
# ca-certificates: HTTPS to the object store; openmpi-bin: mpirun and libmpi;
# openssh-server and -client: in an MPIJob (Kubeflow MPI Operator) the
# launcher pod starts the ranks over SSH in worker pods that run sshd.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openmpi-bin openssh-server openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd
# The operator's conventions: the job's own hosts inside its network (no
# known_hosts), sshd on port 2222.
RUN printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  Port 2222\n' \
    >> /etc/ssh/ssh_config
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
# A non-root user, uid 1000 as in the operator's examples (the MPIJob's pods
# run as it; so do the other pods, which need no root either).
RUN useradd --uid 1000 --create-home --shell /bin/bash switchyard \
 && install -d -o switchyard -g switchyard /var/lib/switchyard
COPY --chown=switchyard:switchyard docker/sshd_config /home/switchyard/.sshd_config
USER switchyard
WORKDIR /var/lib/switchyard
ENTRYPOINT []
CMD ["switchyard", "--help"]
