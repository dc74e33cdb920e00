//! The job's control plane (DESIGN section 2): the tokio service workers
//! register with (`server`), the checkpoint commit it runs (`commit`) and
//! its HTTP status, metrics and dashboard (`http`, `dashboard`). The messages and the worker's
//! client are in the `wire` crate; the layout values in `layout`.

pub mod commit;
pub mod dashboard;
pub mod http;
pub mod server;
