//! Kubernetes manifests for a job (`switchyard k8s render`): the checks
//! and layout (`plan`), the objects (`manifests`) and a YAML writer.

pub mod manifests;
pub mod plan;
pub mod yaml;
