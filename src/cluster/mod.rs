//! What nodes of a cluster share besides the store: the [`Bus`] between them (in-process, or
//! Redis pub/sub when `--redis-url` is set), its channels, and the typed commands that travel on
//! them. Session ownership itself lives in the store (`session_owners`); see `ARCHITECTURE.md`.

mod bus;
mod redis_bus;
mod wire;

pub use bus::{Bus, BusError, Channel, LocalBus, SharedBus, Subscription};
pub use redis_bus::RedisBus;
pub use wire::{ToOwner, decode_to_owner};
