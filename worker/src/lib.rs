//! One rank of a training job (DESIGN section 4): its data, its step
//! engine, its checkpoint IO and its metrics.

pub mod api;
pub mod attention_shards;
pub mod attn_dispatch;
pub mod bf16_payload;
pub mod checkpointing;
pub mod config;
pub mod coordination;
pub mod data;
pub mod dispatch;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod micro_batches;
pub mod overlap;
pub mod precision;
pub mod preemption;
pub mod rank;
pub mod state;
pub mod sync;
pub mod train;

pub use api::{Observer, Resume, RunOptions, StartInfo, TrainSummary};
pub use config::{AttnExpertPlacement, Backend, JobConfig};
pub use error::WorkerError;
