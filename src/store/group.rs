//! Node-wide group commit: the batches of many sessions share one transaction.
//!
//! Each session actor already groups its own writes into one batch at a time. With many quiet
//! sessions that is still one transaction, and one flush to disk, per session per window: a
//! thousand sessions at ten messages a second ask SQLite for ten thousand `fsync`s a second,
//! and its single writer manages about 1,500. [`GroupCommit`] queues the batches of every
//! session of the node and hands whatever has queued to [`Store::commit_group`] at once, so
//! the number of transactions follows the store's speed rather than the number of sessions.
//!
//! Nothing waits on purpose: a batch that finds the lanes idle is committed alone at once, and
//! batches that arrive while a commit is in flight go together in the next one. Ordering within
//! a session is unaffected: a session never has more than one batch in flight.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{SessionBatch, SharedStore, StoreError};
use crate::telemetry;

/// At most this many rows (events and document updates) in one group…
const MAX_GROUP_ROWS: usize = 4096;
/// …and about this many payload bytes, so one group's transaction stays short.
const MAX_GROUP_BYTES: usize = 8 << 20;

struct Queued {
    batch: SessionBatch,
    done: oneshot::Sender<Result<SessionBatch, StoreError>>,
}

/// The node's committer: a handle to a queue that `Store::commit_lanes` tasks drain.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Queued>,
}

impl GroupCommit {
    /// Starts the lanes on the current actix arbiter. They stop when every handle is dropped.
    pub fn start(store: SharedStore) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..store.commit_lanes().max(1) {
            actix::spawn(lane(store.clone(), receiver.clone()));
        }
        Self { queue }
    }

    /// Commits one session's batch, with whatever other sessions' batches are waiting. Gives
    /// the batch back once it is durable.
    pub async fn commit(&self, batch: SessionBatch) -> Result<SessionBatch, StoreError> {
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Queued { batch, done })
            .map_err(|_| StoreError::CommitterStopped)?;
        answer.await.unwrap_or(Err(StoreError::CommitterStopped))
    }
}

/// One lane: takes everything queued (up to the group's bounds), commits it, answers each.
async fn lane(store: SharedStore, queue: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>) {
    loop {
        let group = {
            let mut receiver = queue.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut rows = first.batch.rows();
            let mut bytes = first.batch.bytes();
            let mut group = vec![first];
            while rows < MAX_GROUP_ROWS && bytes < MAX_GROUP_BYTES {
                let Ok(next) = receiver.try_recv() else { break };
                rows += next.batch.rows();
                bytes += next.batch.bytes();
                group.push(next);
            }
            group
        };
        let (batches, answers): (Vec<SessionBatch>, Vec<_>) =
            group.into_iter().map(|q| (q.batch, q.done)).unzip();
        telemetry::commit_group(batches.len());
        // A panic in the store must not take the lane, and with it every later commit, down.
        let results = AssertUnwindSafe(store.commit_group(&batches))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(sessions = batches.len(), "a group commit panicked");
                Vec::new()
            });
        let mut results = results.into_iter();
        for (batch, done) in batches.into_iter().zip(answers) {
            // A store that panicked or answered fewer results than batches vouches for nothing:
            // the session refuses those writes rather than ack them.
            let result = results.next().unwrap_or(Err(StoreError::Unanswered));
            let _ = done.send(result.map(|()| batch));
        }
    }
}
