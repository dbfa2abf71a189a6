//! The bus trait, its channels, the local fan-out both implementations share, and the
//! in-process bus of a single node.
//!
//! Pub/sub is fire-and-forget on every implementation: a message published while a subscriber
//! is away is lost. Nothing that must not be lost travels only on the bus; the store has it, and
//! receivers catch up from there (the scheduler's sweep, the session log).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::protocol::SessionId;

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The channels of a cluster, named under the bus's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Scheduler wake-ups: a task was queued, on some node.
    Tasks,
    /// Commands for the owner of a session (`…:s:{session}:in`).
    SessionIn(SessionId),
    /// The owner's frames for the relays of a session (`…:s:{session}:out`).
    SessionOut(SessionId),
}

impl Channel {
    pub fn name(&self, prefix: &str) -> String {
        match self {
            Self::Tasks => format!("{prefix}:tasks"),
            Self::SessionIn(session) => format!("{prefix}:s:{session}:in"),
            Self::SessionOut(session) => format!("{prefix}:s:{session}:out"),
        }
    }
}

/// A bus between the nodes of a cluster.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `local` or `redis`, for `/readyz` and logs.
    fn kind(&self) -> &'static str;

    /// False while the bus cannot reach the other nodes (Redis is down or reconnecting).
    fn is_up(&self) -> bool;

    /// How many times the bus has lost the other nodes since start. Whatever was published
    /// meanwhile is lost, so a receiver that sees this change must catch up from the store.
    fn outages(&self) -> u64;

    /// Sends `payload` to every subscriber of `channel` on every node, this one included.
    async fn publish(&self, channel: &Channel, payload: Bytes) -> Result<(), BusError>;

    /// Receives what is published on `channel` from now on, until the subscription is dropped.
    async fn subscribe(&self, channel: &Channel) -> Result<Subscription, BusError>;
}

pub type SharedBus = Arc<dyn Bus>;

/// One local subscriber's messages. Dropping it unsubscribes.
pub struct Subscription {
    receiver: mpsc::UnboundedReceiver<Bytes>,
    _guard: SubscriberGuard,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.receiver.recv().await
    }

    /// The subscription as a stream, for `ctx.add_stream`.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Bytes> {
        futures_util::stream::unfold(self, |mut subscription| async move {
            subscription.recv().await.map(|m| (m, subscription))
        })
    }
}

type Senders = Vec<(u64, mpsc::UnboundedSender<Bytes>)>;

/// The local subscribers of every channel: what both buses fan a message out to.
#[derive(Default)]
pub(super) struct Topics {
    by_channel: DashMap<String, Senders>,
    next_id: AtomicU64,
}

impl Topics {
    /// Adds a subscriber; `first` is true when it is the channel's first on this node.
    pub(super) fn add(
        self: &Arc<Self>,
        channel: String,
        on_last_gone: Option<Box<dyn FnOnce(String) + Send + Sync>>,
    ) -> (Subscription, bool) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut senders = self.by_channel.entry(channel.clone()).or_default();
        let first = senders.is_empty();
        senders.push((id, sender));
        drop(senders);
        let guard = SubscriberGuard {
            topics: Arc::clone(self),
            channel,
            id,
            on_last_gone,
        };
        (
            Subscription {
                receiver,
                _guard: guard,
            },
            first,
        )
    }

    /// Hands `payload` to every local subscriber of `channel`.
    pub(super) fn deliver(&self, channel: &str, payload: &Bytes) {
        if let Some(mut senders) = self.by_channel.get_mut(channel) {
            senders.retain(|(_, sender)| sender.send(payload.clone()).is_ok());
        }
    }

    #[cfg(test)]
    pub(super) fn channels(&self) -> Vec<String> {
        self.by_channel.iter().map(|e| e.key().clone()).collect()
    }
}

struct SubscriberGuard {
    topics: Arc<Topics>,
    channel: String,
    id: u64,
    /// Called when the channel's last local subscriber goes (the Redis bus unsubscribes).
    on_last_gone: Option<Box<dyn FnOnce(String) + Send + Sync>>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let emptied = self
            .topics
            .by_channel
            .remove_if_mut(&self.channel, |_, senders| {
                senders.retain(|(id, _)| *id != self.id);
                senders.is_empty()
            })
            .is_some();
        if emptied && let Some(on_last_gone) = self.on_last_gone.take() {
            on_last_gone(self.channel.clone());
        }
    }
}

/// The bus of a single node: publishing delivers to this node's subscribers only.
pub struct LocalBus {
    prefix: String,
    topics: Arc<Topics>,
}

impl LocalBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            prefix: "local".to_owned(),
            topics: Arc::default(),
        })
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn is_up(&self) -> bool {
        true
    }

    fn outages(&self) -> u64 {
        0
    }

    async fn publish(&self, channel: &Channel, payload: Bytes) -> Result<(), BusError> {
        self.topics.deliver(&channel.name(&self.prefix), &payload);
        Ok(())
    }

    async fn subscribe(&self, channel: &Channel) -> Result<Subscription, BusError> {
        Ok(self.topics.add(channel.name(&self.prefix), None).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_subscribers_get_what_is_published_until_they_drop() {
        let bus = LocalBus::new();
        let mut a = bus.subscribe(&Channel::Tasks).await.expect("subscribe");
        let b = bus.subscribe(&Channel::Tasks).await.expect("subscribe");
        bus.publish(&Channel::Tasks, Bytes::from_static(b"one"))
            .await
            .expect("publish");
        assert_eq!(a.recv().await.as_deref(), Some(&b"one"[..]));
        drop(b);
        bus.publish(&Channel::Tasks, Bytes::from_static(b"two"))
            .await
            .expect("publish");
        assert_eq!(a.recv().await.as_deref(), Some(&b"two"[..]));
        drop(a);
        assert!(
            bus.topics.channels().is_empty(),
            "the channel outlived its subscribers"
        );
    }
}
