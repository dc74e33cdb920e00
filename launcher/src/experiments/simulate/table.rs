//! What `switchyard simulate` prints: one point in full, or a grid's
//! points as a table (against measured rows when there are some).

use crate::experiments::sweep::results::PointResult;
use crate::format::human_bytes;
use simulator::cluster::Cluster;
use simulator::kernels::Part;
use simulator::shape::Routing;
use simulator::step::{Amount, BreakdownRow, Options, Prediction};
use worker::JobConfig;

fn ms(s: f64) -> String {
    format!("{:.3} ms", s * 1e3)
}

fn flops(f: f64) -> String {
    if f >= 1e12 {
        format!("{:.2} TFLOP", f / 1e12)
    } else {
        format!("{:.3} GFLOP", f / 1e9)
    }
}

/// The full prediction of one point.
pub fn print_point(job: &JobConfig, cluster: &Cluster, options: Options, routing: Routing, p: &Prediction) {
    let m = &job.model;
    let at = &p.placement;
    let dims = job.parallel_dims().expect("validated at load");
    println!("switchyard simulate: job `{}` on {}", job.name, cluster.name);
    println!(
        "cluster: {} node(s) x {} device(s); this job: {} rank(s) on {} node(s), {} per node, {} per device",
        cluster.node.count, cluster.node.devices, dims.world, at.nodes, at.ranks_per_node, at.ranks_per_device
    );
    if dims.world > cluster.devices() && cluster.device.cores == 1 {
        println!("note: more ranks than devices: ranks share devices (as threads on one CPU would)");
    }
    println!(
        "model: d_model {}, {} layers, {} heads ({} kv), {} experts top-{}, ffn {}, vocab {}, seq {}, capacity {}",
        m.d_model,
        m.n_layers,
        m.n_heads,
        m.n_kv_heads,
        m.n_experts,
        m.top_k,
        m.ffn_hidden,
        m.vocab,
        m.seq_len,
        if m.dropless() { "dropless".to_string() } else { format!("factor {}", m.capacity_factor) }
    );
    println!(
        "layout: attn_tp {} x dp {}, ep {} x edp {}; {} micro-batch(es) of {} sequence(s) per rank; overlap {}; router imbalance {:.2}",
        dims.attn_tp,
        dims.dp,
        dims.ep,
        dims.edp,
        job.grad_accumulation(dims.dp),
        job.train.micro_batch_size,
        if options.overlap { "on" } else { "off" },
        routing.imbalance
    );
    println!();
    println!("| step time | {} |", ms(p.step_s));
    println!("|---|---:|");
    println!("| compute (forward + backward kernels, busiest rank) | {} |", ms(p.compute_s));
    println!(
        "| exposed communication (all-to-all transfer {}, waiting for peers {}, gradient sync {} before overlap) | {} |",
        ms(p.exchange_s),
        ms(p.waiting_s),
        ms(p.sync_s),
        ms(p.exposed_comm_s)
    );
    println!("| other (optimizer, zeroing, metrics, per-step host work) | {} |", ms(p.other_s));
    println!("| tokens/s | {:.0} |", p.tokens_per_s);
    let rate = |tflops: f64| {
        if tflops >= 1.0 {
            format!("{tflops:.1} TFLOP/s")
        } else {
            format!("{:.1} GFLOP/s", tflops * 1e3)
        }
    };
    println!(
        "| MFU (model FLOPs {} per step over the devices' {} peak) | {:.1}% |",
        flops(p.model_flops_per_step),
        rate(cluster.device.matrix_tflops),
        100.0 * p.mfu
    );
    let devices = dims.world.div_ceil(at.ranks_per_device) as f64;
    println!("| model FLOP/s per device | {} |", rate(p.model_flops_per_step / p.step_s / 1e12 / devices));
    println!();
    let name = |part: Part| match part {
        Part::Attention => "attention",
        Part::Router => "router",
        Part::Experts => "routed experts",
        Part::SharedExperts => "shared experts",
        Part::DenseFfn => "dense FFN (first layers)",
        Part::Head => "LM head",
    };
    let parts: Vec<String> = p
        .flops_by_part
        .iter()
        .filter(|(_, f)| *f > 0.0)
        .map(|(part, f)| format!("{} {}", name(*part), flops(*f)))
        .collect();
    println!("matrix FLOPs per step on the busiest rank: {} ({})", flops(p.rank_flops), parts.join(", "));
    println!("expert rows per rank per step: busiest {:.0}, mean {:.0}", p.expert_rows_max, p.expert_rows_mean);
    println!(
        "all-to-all per step (expert rows, all ranks): inside nodes {}, between nodes {}",
        human_bytes(p.alltoall_bytes.intra),
        human_bytes(p.alltoall_bytes.inter)
    );
    let mem = &p.memory;
    let capacity = cluster.device.memory_gib * (1u64 << 30) as f64 / at.ranks_per_device as f64;
    println!(
        "memory per rank: parameters {}, gradients {}, optimizer {}, activations {}, buffers {} = {} of {}{}",
        human_bytes(mem.params),
        human_bytes(mem.grads),
        human_bytes(mem.optimizer),
        human_bytes(mem.activations),
        human_bytes(mem.buffers),
        human_bytes(mem.total()),
        human_bytes(capacity),
        if mem.total() > capacity { "  DOES NOT FIT" } else { "" }
    );
}

/// One line per point; with measured rows, measured and predicted side by side.
pub fn print_grid(cluster: &Cluster, predicted: &[PointResult], measured: &[PointResult]) {
    println!("switchyard simulate on {}", cluster.name);
    println!();
    let opt_ms = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.2}", s * 1e3 + 0.0));
    if measured.is_empty() {
        println!("| point | step ms | compute | exposed comm | other | tokens/s | MFU | all-to-all intra / inter per step | memory per rank |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in predicted {
            if !r.ok() {
                println!("| {} | failed: {} |||||||", label(r), r.error.as_deref().unwrap_or(""));
                continue;
            }
            println!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.1}% | {} / {} | {} |",
                label(r),
                opt_ms(r.step_s),
                opt_ms(r.compute_s),
                opt_ms(r.exposed_comm_s),
                opt_ms(r.other_s),
                r.tokens_per_s.unwrap_or(0.0),
                100.0 * r.mfu.unwrap_or(0.0),
                human_bytes(r.alltoall_intra_bytes_per_step.unwrap_or(0.0)),
                human_bytes(r.alltoall_inter_bytes_per_step.unwrap_or(0.0)),
                human_bytes(r.memory_per_rank_mib.unwrap_or(0.0) * (1u64 << 20) as f64),
            );
        }
        return;
    }
    println!(
        "| point | measured step ms | predicted step ms | error | measured compute / comm / other | predicted compute / comm / other \
         | all-to-all waiting for peers: measured / predicted | all-to-all transfer: measured / predicted |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in predicted {
        let Some(m) = measured.iter().find(|m| m.id == r.id && m.ok()) else {
            println!(
                "| {} | - | {} | - | - | - | - / {} | - / {} |",
                label(r),
                opt_ms(r.step_s),
                opt_ms(r.alltoall_peer_wait_s),
                opt_ms(r.alltoall_transfer_s)
            );
            continue;
        };
        let error = match (m.step_s, r.step_s) {
            (Some(a), Some(b)) => format!("{:+.1}%", 100.0 * (b - a) / a),
            _ => "-".into(),
        };
        let split =
            |x: &PointResult| format!("{} / {} / {}", opt_ms(x.compute_s), opt_ms(x.exposed_comm_s), opt_ms(x.other_s));
        println!(
            "| {} | {} | {} | {error} | {} | {} | {} / {} | {} / {} |",
            label(r),
            opt_ms(m.step_s),
            opt_ms(r.step_s),
            split(m),
            split(r),
            opt_ms(m.alltoall_peer_wait_s),
            opt_ms(r.alltoall_peer_wait_s),
            opt_ms(m.alltoall_transfer_s),
            opt_ms(r.alltoall_transfer_s)
        );
    }
}

fn label(r: &PointResult) -> String {
    r.values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Where the predicted time goes, kernel by kernel and collective by collective.
pub fn print_breakdown(rows: &[BreakdownRow]) {
    println!();
    println!("| kernel or collective (per step, busiest rank) | predicted |");
    println!("|---|---:|");
    for row in rows {
        let amount = match row.amount {
            Amount::Flops(f) => format!("{:.3} GFLOP", f / 1e9),
            Amount::Bytes(b) => human_bytes(b),
            Amount::Calls(n) => format!("x{n}"),
        };
        println!("| {} ({amount}) | {} |", row.name, ms(row.seconds));
    }
}
