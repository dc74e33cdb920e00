//! `[train] precision`: the element type of the matrix products. Master
//! weights, gradients (their accumulation and all-reduce), AdamW, RMSNorm,
//! softmax, the routers and the loss stay fp32 in every precision, so a
//! checkpoint (fp32 master weights) resumes in either one.

use crate::JobConfig;
use model::gemm::{self, Precision, FP32_ONEDNN_MIN_MACS};
use serde::{Deserialize, Serialize};

/// What the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// fp32 products (the built-in kernels).
    #[default]
    Fp32,
    /// bf16 factors, fp32 accumulation.
    Bf16,
    /// bf16 where the CPU has bf16 matrix units (AMX-BF16, AVX512-BF16),
    /// oneDNN is installed to drive them and the model's expert products
    /// are large enough to gain, else fp32.
    Auto,
}

impl PrecisionChoice {
    /// The config's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PrecisionChoice::Fp32 => "fp32",
            PrecisionChoice::Bf16 => "bf16",
            PrecisionChoice::Auto => "auto",
        }
    }
}

/// The precision a job runs in, and the banner line that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub precision: Precision,
    pub line: String,
}

/// Multiply-adds of one expert's forward product at balanced routing
/// (`tokens x top_k / experts` rows of `d_model x ffn_hidden`): what
/// decides whether bf16 pays on this CPU.
pub fn expert_product_macs(job: &JobConfig) -> usize {
    let m = &job.model;
    let tokens = job.train.micro_batch_size * m.seq_len;
    let rows = (tokens * m.top_k.max(1)).div_ceil(m.n_experts.max(1));
    rows * m.d_model * m.ffn_hidden
}

/// What `[train] precision` means for `job` on this machine.
pub fn resolve(job: &JobConfig) -> Resolved {
    let choice = job.train.precision;
    let macs = expert_product_macs(job);
    let units = gemm::cpu_has_bf16_units();
    let (precision, why) = match choice {
        PrecisionChoice::Fp32 => (Precision::Fp32, "[train] precision = \"fp32\"".to_string()),
        PrecisionChoice::Bf16 if !units => (
            Precision::Bf16,
            "[train] precision = \"bf16\" on a CPU without bf16 matrix units: bf16 numbers at fp32 speed or less"
                .to_string(),
        ),
        PrecisionChoice::Bf16 => (Precision::Bf16, "[train] precision = \"bf16\"".to_string()),
        PrecisionChoice::Auto if !units => (Precision::Fp32, "auto: this CPU has no bf16 matrix units".to_string()),
        PrecisionChoice::Auto if macs < FP32_ONEDNN_MIN_MACS => (
            Precision::Fp32,
            format!(
                "auto: this model's expert products ({:.1}M multiply-adds) are too small for bf16 to gain; it pays from {}M",
                macs as f64 / 1e6,
                FP32_ONEDNN_MIN_MACS >> 20
            ),
        ),
        PrecisionChoice::Auto => match gemm::onednn::get() {
            Ok(_) => (Precision::Bf16, "auto: this CPU has bf16 matrix units".to_string()),
            Err(e) => (Precision::Fp32, format!("auto: bf16 units but {e}")),
        },
    };
    let what = match precision {
        Precision::Fp32 => "fp32 products",
        Precision::Bf16 => "bf16 products, fp32 accumulation, master weights, gradients and AdamW",
    };
    Resolved { precision, line: format!("precision: {what} on {} ({why})", gemm::describe(precision)) }
}

/// Sets this process's products to the job's precision.
pub fn apply(job: &JobConfig) -> Resolved {
    let resolved = resolve(job);
    gemm::set_precision(resolved.precision);
    resolved
}
