//! `[train] precision`: the element type of the matrix products. Master
//! weights, gradients (their accumulation and all-reduce), AdamW, RMSNorm,
//! softmax, the routers and the loss stay fp32 in every precision, so a
//! checkpoint (fp32 master weights) resumes in either one.

use model::gemm::{self, Precision};
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
    /// bf16 where the CPU has bf16 matrix units (AMX-BF16, AVX512-BF16)
    /// and oneDNN is installed to drive them, else fp32.
    Auto,
}

/// The precision a job runs in, and the banner line that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub precision: Precision,
    pub line: String,
}

/// What `choice` means on this machine.
pub fn resolve(choice: PrecisionChoice) -> Resolved {
    let units = gemm::cpu_has_bf16_units();
    let (precision, why) = match choice {
        PrecisionChoice::Fp32 => (Precision::Fp32, "[train] precision = \"fp32\"".to_string()),
        PrecisionChoice::Bf16 if !units => (
            Precision::Bf16,
            "[train] precision = \"bf16\" on a CPU without bf16 matrix units: bf16 numbers at fp32 speed or less"
                .to_string(),
        ),
        PrecisionChoice::Bf16 => (Precision::Bf16, "[train] precision = \"bf16\"".to_string()),
        PrecisionChoice::Auto => match (units, gemm::onednn::get()) {
            (true, Ok(_)) => (Precision::Bf16, "auto: this CPU has bf16 matrix units".to_string()),
            (false, _) => (Precision::Fp32, "auto: this CPU has no bf16 matrix units".to_string()),
            (true, Err(e)) => (Precision::Fp32, format!("auto: bf16 units but {e}")),
        },
    };
    let what = match precision {
        Precision::Fp32 => "fp32 products",
        Precision::Bf16 => "bf16 products, fp32 accumulation, master weights, gradients and AdamW",
    };
    Resolved { precision, line: format!("precision: {what} on {} ({why})", gemm::describe(precision)) }
}

/// Sets this process's products to the job's precision.
pub fn apply(choice: PrecisionChoice) -> Resolved {
    let resolved = resolve(choice);
    gemm::set_precision(resolved.precision);
    resolved
}
