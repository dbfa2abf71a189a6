//! The Redis bus: one reconnecting connection (redis 1.8 `ConnectionManager`) for publishing,
//! and one for subscriptions over RESP3, whose pushes a dispatcher task fans out to local
//! subscribers. After a reconnect the manager resubscribes by itself; until then the bus reports
//! itself down, and `/readyz` says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::bus::{Bus, BusError, Channel, Subscription, Topics};
use crate::telemetry;

pub struct RedisBus {
    prefix: String,
    publisher: ConnectionManager,
    subscriber: ConnectionManager,
    topics: Arc<Topics>,
    up: Arc<AtomicBool>,
    /// Disconnections of the subscription connection since start.
    outages: Arc<AtomicU64>,
}

impl RedisBus {
    /// Connects to `url` (RESP3 is asked for, since pushes need it). Channels are named under
    /// `prefix`, so clusters can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<Self>, BusError> {
        let url = if url.contains("protocol=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        };
        let client = redis::Client::open(url)?;
        let config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_max_delay(Duration::from_secs(2))
        };
        let publisher = ConnectionManager::new_with_config(client.clone(), config()).await?;
        let (pushes, received) = mpsc::unbounded_channel::<PushInfo>();
        let subscriber = ConnectionManager::new_with_config(
            client,
            config()
                .set_push_sender(pushes)
                .set_automatic_resubscription(),
        )
        .await?;
        let topics = Arc::<Topics>::default();
        let up = Arc::new(AtomicBool::new(true));
        let outages = Arc::<AtomicU64>::default();
        tokio::spawn(dispatch(
            received,
            Arc::clone(&topics),
            Arc::clone(&up),
            Arc::clone(&outages),
        ));
        let bus = Arc::new(Self {
            prefix: prefix.to_owned(),
            publisher,
            subscriber,
            topics,
            up,
            outages,
        });
        tokio::spawn(revive(Arc::downgrade(&bus)));
        Ok(bus)
    }
}

/// Routes pushed messages to local subscribers, and tracks whether the subscription connection
/// is up: down at a disconnection, up again once the manager has resubscribed.
async fn dispatch(
    mut received: mpsc::UnboundedReceiver<PushInfo>,
    topics: Arc<Topics>,
    up: Arc<AtomicBool>,
    outages: Arc<AtomicU64>,
) {
    while let Some(push) = received.recv().await {
        match push.kind {
            PushKind::Message => match <[Value; 2]>::try_from(push.data) {
                Ok([Value::BulkString(channel), Value::BulkString(payload)]) => {
                    let channel = String::from_utf8_lossy(&channel);
                    topics.deliver(&channel, &Bytes::from(payload));
                }
                Ok(_) | Err(_) => {
                    telemetry::bus_corrupt();
                    tracing::warn!("dropping a bus message of an unexpected shape");
                }
            },
            PushKind::Disconnection if up.swap(false, Ordering::SeqCst) => {
                outages.fetch_add(1, Ordering::SeqCst);
                tracing::warn!("lost the Redis bus; cross-node messages pause until it is back");
                telemetry::bus_up(false);
            }
            PushKind::Subscribe if !up.swap(true, Ordering::SeqCst) => {
                tracing::info!("the Redis bus is back");
                telemetry::bus_up(true);
            }
            _ => {}
        }
    }
}

/// While the bus is down, pings the subscription connection every second. The manager only
/// retries a reconnect a few times on its own and then waits for a command; the ping is that
/// command, so the bus comes back (and resubscribes) however long Redis was away. Ends with the
/// bus.
async fn revive(bus: std::sync::Weak<RedisBus>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(bus) = bus.upgrade() else {
            return;
        };
        if !bus.is_up() {
            let mut subscriber = bus.subscriber.clone();
            let _: Result<String, _> = redis::cmd("PING").query_async(&mut subscriber).await;
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn outages(&self) -> u64 {
        self.outages.load(Ordering::SeqCst)
    }

    async fn publish(&self, channel: &Channel, payload: Bytes) -> Result<(), BusError> {
        let mut publisher = self.publisher.clone();
        let published: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(channel.name(&self.prefix))
            .arg(payload.as_ref())
            .query_async(&mut publisher)
            .await;
        published.map(|_| ()).map_err(BusError::from)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<Subscription, BusError> {
        let name = channel.name(&self.prefix);
        let unsubscriber = self.subscriber.clone();
        let on_last_gone = Box::new(move |name: String| {
            let mut unsubscriber = unsubscriber.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(err) = unsubscriber.unsubscribe(&name).await {
                        tracing::debug!(%err, channel = %name, "unsubscribe failed");
                    }
                });
            }
        });
        let (subscription, first) = self.topics.add(name.clone(), Some(on_last_gone));
        if first {
            self.subscriber.clone().subscribe(&name).await?;
        }
        Ok(subscription)
    }
}
