//! Connection actors: one per socket, each owning its socket and outbound queue.

mod client;
mod outbound;

pub use client::ClientConn;
pub use outbound::{Outbound, Pushed};
