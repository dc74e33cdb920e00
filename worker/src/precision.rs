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
    /// oneDNN is installed to drive them and its kernel gains at the
    /// model's expert products (see [`auto_choice`]), else fp32.
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

/// One expert's forward product at balanced routing, as (rows, inner,
/// columns): `tokens x top_k / experts` rows of `d_model x ffn_hidden`.
fn expert_product_shape(job: &JobConfig) -> (usize, usize, usize) {
    let m = &job.model;
    let tokens = job.train.micro_batch_size * m.seq_len;
    let rows = (tokens * m.top_k.max(1)).div_ceil(m.n_experts.max(1));
    (rows, m.d_model, m.ffn_hidden)
}

/// Multiply-adds of one expert's forward product at balanced routing:
/// what decides whether bf16 pays on this CPU.
pub fn expert_product_macs(job: &JobConfig) -> usize {
    let (rows, inner, columns) = expert_product_shape(job);
    rows * inner * columns
}

/// What `[train] precision` means for `job` on this machine.
pub fn resolve(job: &JobConfig) -> Resolved {
    let (precision, why) = match job.train.precision {
        PrecisionChoice::Fp32 => (Precision::Fp32, "[train] precision = \"fp32\"".to_string()),
        PrecisionChoice::Bf16 if !gemm::cpu_has_bf16_units() => (
            Precision::Bf16,
            "[train] precision = \"bf16\" on a CPU without bf16 matrix units: bf16 numbers at fp32 speed or less"
                .to_string(),
        ),
        PrecisionChoice::Bf16 => (Precision::Bf16, "[train] precision = \"bf16\"".to_string()),
        PrecisionChoice::Auto if !gemm::cpu_has_bf16_units() => {
            (Precision::Fp32, "auto: this CPU has no bf16 matrix units".to_string())
        }
        PrecisionChoice::Auto => {
            let (rows, inner, columns) = expert_product_shape(job);
            let kernel = gemm::onednn::get().and_then(|lib| {
                lib.implementation(rows.max(1), inner, columns, true).map_err(|_| "oneDNN has no bf16 product")
            });
            auto_choice(expert_product_macs(job), kernel.as_deref().map_err(|e| *e))
        }
    };
    let what = match precision {
        Precision::Fp32 => "fp32 products",
        Precision::Bf16 => "bf16 products, fp32 accumulation, master weights, gradients and AdamW",
    };
    Resolved { precision, line: format!("precision: {what} on {} ({why})", gemm::describe(precision)) }
}

/// `precision = "auto"` on a CPU with bf16 units, given the multiply-adds
/// of the model's expert product and the oneDNN kernel that would run it
/// in bf16 (or why none would). On AVX512-BF16 kernels bf16 paid at both
/// sizes measured (on an AMD EPYC the default job 1.2-1.5x fp32, the D512
/// layer 1.76x; docs/kernels.md);
/// on AMX kernels only large products were measured to gain (on a Xeon
/// the default job ran at the same speed in both, so there fp32 keeps its
/// exactness).
fn auto_choice(macs: usize, bf16_kernel: Result<&str, &str>) -> (Precision, String) {
    match bf16_kernel {
        Err(e) => (Precision::Fp32, format!("auto: bf16 units but {e}")),
        Ok(kernel) if kernel.contains("amx") && macs < FP32_ONEDNN_MIN_MACS => (
            Precision::Fp32,
            format!(
                "auto: this model's expert products ({:.1}M multiply-adds) are too small for AMX's bf16 to gain; it pays from {}M",
                macs as f64 / 1e6,
                FP32_ONEDNN_MIN_MACS >> 20
            ),
        ),
        Ok(kernel) => (Precision::Bf16, format!("auto: this CPU has bf16 matrix units ({kernel})")),
    }
}

/// Sets this process's products to the job's precision.
pub fn apply(job: &JobConfig) -> Resolved {
    let resolved = resolve(job);
    gemm::set_precision(resolved.precision);
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_bf16_where_its_kernel_gains() {
        let (small, large) = (4 << 20, FP32_ONEDNN_MIN_MACS);
        let amx = Ok("brg:avx512_core_amx_bf16");
        let avx512 = Ok("brg:avx512_core_bf16");
        assert_eq!(auto_choice(small, amx).0, Precision::Fp32);
        assert!(auto_choice(small, amx).1.contains("too small for AMX"), "{}", auto_choice(small, amx).1);
        assert_eq!(auto_choice(large, amx).0, Precision::Bf16);
        assert_eq!(auto_choice(small, avx512).0, Precision::Bf16);
        assert!(auto_choice(small, avx512).1.contains("avx512_core_bf16"));
        let missing = auto_choice(large, Err("oneDNN (libdnnl.so.2) is not installed"));
        assert_eq!(missing.0, Precision::Fp32);
        assert!(missing.1.contains("not installed"), "{}", missing.1);
    }
}
