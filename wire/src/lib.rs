//! The job's control protocol (DESIGN section 2): every message between a
//! worker and the coordinator, the one codec that frames them
//! ([`protocol`]), and the worker's side of the connection ([`client`]),
//! on blocking std sockets. The coordinator's tokio server lives in the
//! `coordinator` crate, so a worker links no server.

pub mod client;
pub mod metrics_file;
pub mod protocol;
pub mod tensorboard;

pub use client::{ClientError, CoordinatorClient};
pub use protocol::{Message, ProtocolError};
