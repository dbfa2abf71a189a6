//! What nodes of a cluster share besides the store: the [`Bus`] between them (in-process, or
//! Redis pub/sub when `--redis-url` is set), its channels, and the typed commands that travel on
//! them. Session ownership itself lives in the store (`session_owners`); see `ARCHITECTURE.md`.

mod bus;
mod publisher;
mod redis_bus;
mod wire;

pub use bus::{Bus, BusError, Channel, LocalBus, SharedBus, Subscription};
pub use publisher::OrderedPublisher;
pub use redis_bus::RedisBus;
pub use wire::{RelayBody, RelayFrame, ToOwner, decode, decode_to_owner};
