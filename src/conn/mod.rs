//! Connection actors: one per socket, each owning its socket and outbound queue.

mod client;
mod outbound;
mod rate;
mod yjs;

pub use client::ClientConn;
pub use outbound::{Outbound, Pushed};
pub use yjs::YjsConn;
