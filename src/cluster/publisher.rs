//! Publishing in order: one task per channel awaits each publish before the next, so the
//! receivers see the messages in the order they were handed over. (Spawning one task per
//! message would let a later message overtake an earlier one.)

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Channel, SharedBus};

/// The sending end of one channel's ordered publisher. Dropping it ends the task once what was
/// handed over is published.
#[derive(Clone)]
pub struct OrderedPublisher {
    queue: mpsc::UnboundedSender<Bytes>,
}

impl OrderedPublisher {
    pub fn start(bus: SharedBus, channel: Channel) -> Self {
        let (queue, mut queued) = mpsc::unbounded_channel::<Bytes>();
        tokio::spawn(async move {
            while let Some(payload) = queued.recv().await {
                // A message published while the bus is down is lost, like any pub/sub message;
                // receivers notice by the bus's outage count or a hole in sequence numbers.
                if let Err(err) = bus.publish(&channel, payload).await {
                    tracing::debug!(%err, ?channel, "bus message not published");
                }
            }
        });
        Self { queue }
    }

    pub fn publish(&self, payload: Bytes) {
        let _ = self.queue.send(payload);
    }
}
