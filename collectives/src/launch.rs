//! Rank discovery: which rank this process is, read from the variables
//! its launcher set (OpenMPI, PMIx, Slurm, MPICH, torchrun, a Kubernetes
//! Indexed Job), before any backend starts. Every process backend (mpi,
//! nccl) asks here, so a new launcher is one entry in one table.

/// This process's place in a job started by a launcher, read from the
/// environment before any backend is initialised (launchers decide on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchedRank {
    pub rank: usize,
    /// World size when the launcher says it (`None`: ask MPI).
    pub size: Option<usize>,
    /// The variable the rank came from, for messages.
    pub source: &'static str,
}

/// The rank given by the launcher that started this process: OpenMPI's
/// `mpirun` (OMPI_COMM_WORLD_RANK), any PMIx launcher (PMIX_RANK), Slurm's
/// `srun` (SLURM_PROCID inside a job step), MPICH/Hydra (PMI_RANK),
/// torchrun-style launchers such as PyTorchJob (RANK, WORLD_SIZE), or a
/// Kubernetes Indexed Job / JobSet (JOB_COMPLETION_INDEX, one rank per pod).
/// `None` when this process was started by hand.
pub fn launched_rank() -> Option<LaunchedRank> {
    launched_rank_from(|name| std::env::var(name).ok())
}

/// [`launched_rank`] over any variable lookup (tests pass a map).
pub fn launched_rank_from(var: impl Fn(&str) -> Option<String>) -> Option<LaunchedRank> {
    let number = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    // A batch script also has SLURM_PROCID=0; only a job step (srun) is a launch.
    let srun_step = var("SLURM_STEP_ID").is_some();
    // MPI launchers first: under `mpirun` inside a PyTorchJob pod, RANK is
    // the pod's and OMPI_COMM_WORLD_RANK the process's. PMIx puts no size in
    // the environment (under srun, Slurm does); a pod's index says nothing
    // about the world size (the job config does).
    let pmix_size = if srun_step { "SLURM_NTASKS" } else { "PMIX_SIZE" };
    let sources: [(&'static str, Option<&str>, bool); 6] = [
        ("OMPI_COMM_WORLD_RANK", Some("OMPI_COMM_WORLD_SIZE"), true),
        ("PMIX_RANK", Some(pmix_size), true),
        ("SLURM_PROCID", Some("SLURM_NTASKS"), srun_step),
        ("PMI_RANK", Some("PMI_SIZE"), true),
        ("RANK", Some("WORLD_SIZE"), true),
        ("JOB_COMPLETION_INDEX", None, true),
    ];
    sources.into_iter().find_map(|(rank_var, size_var, applies)| {
        let rank = number(rank_var).filter(|_| applies)?;
        Some(LaunchedRank { rank, size: size_var.and_then(number), source: rank_var })
    })
}

/// This process's place among the ranks its launcher started on the same
/// machine: (local rank, ranks on this machine), from OpenMPI
/// (OMPI_COMM_WORLD_LOCAL_*), PMIx (PMIX_LOCAL_*), Slurm's srun
/// (SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE), MPICH/Hydra
/// (MPI_LOCALRANKID, MPI_LOCALNRANKS) or torchrun (LOCAL_RANK,
/// LOCAL_WORLD_SIZE). `None` when the launcher does not say.
pub fn local_place() -> Option<(usize, usize)> {
    local_place_from(|name| std::env::var(name).ok())
}

/// [`local_place`] over any variable lookup (tests pass a map).
pub fn local_place_from(var: impl Fn(&str) -> Option<String>) -> Option<(usize, usize)> {
    // Slurm writes tasks per node as "2(x3),1": this node's count comes first
    // only on the first nodes, so any count is an estimate; take the largest.
    let number = |name: &str| {
        let value = var(name)?;
        value.split([',', '(']).filter_map(|part| part.trim().parse::<usize>().ok()).max()
    };
    let pairs = [
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
        ("SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ];
    pairs.into_iter().find_map(|(rank, size)| Some((number(rank)?, number(size)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn local_place_comes_from_the_launchers_variables() {
        let place = |vars: &[(&str, &str)]| {
            let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            local_place_from(|name| map.get(name).cloned())
        };
        assert_eq!(place(&[("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "4")]), Some((1, 4)));
        assert_eq!(place(&[("SLURM_LOCALID", "0"), ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1")]), Some((0, 2)));
        assert_eq!(place(&[("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "8")]), Some((3, 8)));
        assert_eq!(place(&[("OMPI_COMM_WORLD_LOCAL_RANK", "1")]), None, "a rank without a size says nothing");
    }

    fn from(vars: &[(&str, &str)]) -> Option<LaunchedRank> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        launched_rank_from(|name| map.get(name).cloned())
    }

    #[test]
    fn reads_every_launcher_and_ignores_a_batch_script() {
        assert_eq!(from(&[]), None);
        let ompi = from(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4")]).unwrap();
        assert_eq!((ompi.rank, ompi.size, ompi.source), (3, Some(4), "OMPI_COMM_WORLD_RANK"));
        assert_eq!(from(&[("PMIX_RANK", "2")]).unwrap().size, None);
        // srun --mpi=pmix: the rank from PMIx, the size from Slurm.
        let pmix = from(&[("PMIX_RANK", "1"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", "0")]).unwrap();
        assert_eq!((pmix.rank, pmix.size, pmix.source), (1, Some(2), "PMIX_RANK"));
        // sbatch's script itself has SLURM_PROCID=0 but is not a rank of a step.
        assert_eq!(from(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]), None);
        let srun = from(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_ID", "0")]).unwrap();
        assert_eq!((srun.rank, srun.size), (1, Some(4)));
        // OpenMPI's own variables win over Slurm's under `srun mpirun`-style nesting.
        let both = from(&[("SLURM_PROCID", "0"), ("SLURM_STEP_ID", "0"), ("OMPI_COMM_WORLD_RANK", "2")]).unwrap();
        assert_eq!(both.rank, 2);
    }

    #[test]
    fn reads_torchrun_and_indexed_job_variables() {
        let torchrun = from(&[("RANK", "5"), ("WORLD_SIZE", "8")]).unwrap();
        assert_eq!((torchrun.rank, torchrun.size, torchrun.source), (5, Some(8), "RANK"));
        let pod = from(&[("JOB_COMPLETION_INDEX", "3")]).unwrap();
        assert_eq!((pod.rank, pod.size, pod.source), (3, None, "JOB_COMPLETION_INDEX"));
        // torchrun's global RANK beats the pod index (several ranks per pod).
        assert_eq!(from(&[("JOB_COMPLETION_INDEX", "1"), ("RANK", "6")]).unwrap().rank, 6);
        // MPI's own rank beats both under mpirun inside such a pod.
        let nested = from(&[("RANK", "1"), ("JOB_COMPLETION_INDEX", "1"), ("OMPI_COMM_WORLD_RANK", "4")]).unwrap();
        assert_eq!(nested.source, "OMPI_COMM_WORLD_RANK");
        // Not a number: not a launch.
        assert_eq!(from(&[("RANK", "leader")]), None);
    }
}
