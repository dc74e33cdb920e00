//! Which node (machine) each expert-parallel position runs on, for plans
//! that keep traffic on a node and for counting what crosses nodes.

use layout::ParallelDims;

/// The node of each position of expert-parallel group `edp_rank`, as node
/// numbers in order of first appearance of the ranks' host names. Plans
/// are made from group 0 (every group holds the same plan).
pub(crate) fn ep_nodes(dims: &ParallelDims, hosts: &[String], edp_rank: usize) -> Vec<usize> {
    let mut names: Vec<&str> = Vec::new();
    let mut nodes = vec![0; dims.ep];
    for (rank, host) in hosts.iter().enumerate().filter(|&(rank, _)| dims.edp_rank(rank) == edp_rank) {
        let id = names.iter().position(|n| n == host).unwrap_or_else(|| {
            names.push(host);
            names.len() - 1
        });
        nodes[dims.ep_rank(rank)] = id;
    }
    nodes
}
