//! Connection actors: one per socket, each owning its socket and outbound queue, and the
//! WebSocket transport they read and write through.

mod client;
mod guard;
mod keepalive;
mod outbound;
mod rate;
pub mod socket;
mod worker;
mod yjs;

pub use client::ClientConn;
pub use keepalive::Stopping;
pub use outbound::{Outbound, Pushed};
pub use worker::WorkerConn;
pub use yjs::YjsConn;
