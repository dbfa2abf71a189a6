//! Connection actors: one per socket, each owning its socket and outbound queue.

mod client;
mod guard;
mod outbound;
mod rate;
mod worker;
mod yjs;

pub use client::ClientConn;
pub use outbound::{Outbound, Pushed};
pub use worker::WorkerConn;
pub use yjs::YjsConn;
