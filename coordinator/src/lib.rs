//! The job's control plane (DESIGN section 2): the tokio service workers
//! register with (`server`), the checkpoint commit it runs (`commit`) and
//! its HTTP status and metrics (`http`). The messages and the worker's
//! client are in the `wire` crate; the layout values in `layout`.

pub mod commit;
mod http;
pub mod server;
