//! Conclave: a real-time collaboration server for people and AI agents, built on actix actors.
//!
//! The crate is both the `conclave` binary and this library, which tests and benches use to start
//! real nodes. See `ARCHITECTURE.md` for the actors and where each guarantee is enforced.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod council;
pub mod http;
pub mod load;
pub mod node;
pub mod protocol;
pub mod server;
pub mod session;
pub mod store;
pub mod supervisor;
pub mod tasks;
pub mod telemetry;
pub mod worker_client;

pub use config::ServeConfig;
pub use server::{RunningServer, start, start_with_store};
