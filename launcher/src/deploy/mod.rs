//! Running a job on a cluster manager: Kubernetes manifests (`k8s`) and
//! Slurm batch scripts (`slurm`).

pub mod k8s;
pub mod slurm;
