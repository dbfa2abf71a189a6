//! A connection's outbound queue: bounded in bytes, drained to the socket by one writer task.
//!
//! actix-ws sends through a small channel whose `send` waits when the client does not read. The
//! connection actor must never wait on that, so frames go into this queue and a local task
//! writes them in order. The queue counts the bytes it holds, live frames and replayed history
//! apart: when a live frame would push it past its bound, presence is shed and anything else
//! marks the client a slow consumer; replay has its own, larger allowance so a client that fell
//! behind can catch up. A slow consumer's queued frames are discarded and it gets a close frame
//! (1013), so a stalled reader costs at most the bounds, never unbounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use actix_ws::{CloseCode, CloseReason, Session};
use bytestring::ByteString;
use tokio::sync::mpsc;

use crate::session::{FrameClass, REPLAY_BUDGET_FACTOR};

/// Which byte count a queued frame is charged to.
#[derive(Clone, Copy)]
enum Account {
    Live,
    Replay,
}

enum Outgoing {
    Text(ByteString, Account),
    Binary(bytes::Bytes, Account),
    Ping,
    Close(CloseReason),
}

/// What [`Outbound::push_text`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A presence frame was dropped because the client is behind.
    Shed,
    /// The client is too far behind: the caller must disconnect it (see
    /// [`Outbound::drop_slow_consumer`]).
    SlowConsumer,
    /// The writer has stopped: the socket is gone.
    Closed,
}

/// Bytes queued per account, shared with the writer.
#[derive(Default)]
struct Queued {
    live: AtomicUsize,
    replay: AtomicUsize,
    /// Set when the client is dropped: the writer skips everything up to the close frame.
    discard: AtomicBool,
}

impl Queued {
    fn counter(&self, account: Account) -> &AtomicUsize {
        match account {
            Account::Live => &self.live,
            Account::Replay => &self.replay,
        }
    }
}

/// The sending half, owned by the connection actor.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<Queued>,
    limit: usize,
}

/// How long one write may wait for the client to read before the socket is given up. It also
/// bounds how long a writer outlives its connection actor while flushing a close frame.
const WRITE_STALL: Duration = Duration::from_secs(30);

impl Outbound {
    /// Starts the writer task for `session` on the current arbiter. The task outlives the
    /// connection actor just long enough to flush a final close frame.
    pub fn start(session: Session, limit: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(Queued::default());
        actix::spawn(write_loop(session, rx, queued.clone()));
        Self { tx, queued, limit }
    }

    pub fn push_text(&self, frame: ByteString, class: FrameClass) -> Pushed {
        let len = frame.len();
        self.push(len, class, |account| Outgoing::Text(frame, account))
    }

    pub fn push_binary(&self, frame: bytes::Bytes, class: FrameClass) -> Pushed {
        let len = frame.len();
        self.push(len, class, |account| Outgoing::Binary(frame, account))
    }

    fn push(
        &self,
        len: usize,
        class: FrameClass,
        item: impl FnOnce(Account) -> Outgoing,
    ) -> Pushed {
        if self.queued.discard.load(Ordering::Relaxed) {
            return Pushed::Closed;
        }
        let (account, limit) = match class {
            FrameClass::Replay => (
                Account::Replay,
                self.limit.saturating_mul(REPLAY_BUDGET_FACTOR),
            ),
            FrameClass::Ordered | FrameClass::Presence => (Account::Live, self.limit),
        };
        let counter = self.queued.counter(account);
        let queued = counter.load(Ordering::Relaxed);
        if queued + len > limit && queued > 0 {
            return match class {
                FrameClass::Presence => Pushed::Shed,
                FrameClass::Ordered | FrameClass::Replay => Pushed::SlowConsumer,
            };
        }
        counter.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(item(account)).is_err() {
            return Pushed::Closed;
        }
        Pushed::Queued
    }

    pub fn ping(&self) {
        let _ = self.tx.send(Outgoing::Ping);
    }

    /// Queues a close frame after everything already queued.
    pub fn close(&self, code: CloseCode, description: &str) {
        let _ = self.tx.send(Outgoing::Close(CloseReason {
            code,
            description: Some(description.to_owned()),
        }));
    }

    /// Drops a client that cannot keep up: everything still queued is discarded, and the close
    /// frame (1013, "try again later") goes out as soon as the socket has room for it. The
    /// client resumes from its last offset.
    pub fn drop_slow_consumer(&self) {
        self.queued.discard.store(true, Ordering::Relaxed);
        self.close(
            CloseCode::Again,
            "too slow: reconnect and resume from your offset",
        );
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.live.load(Ordering::Relaxed) + self.queued.replay.load(Ordering::Relaxed)
    }
}

async fn write_loop(
    mut session: Session,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<Queued>,
) {
    while let Some(item) = rx.recv().await {
        let sent = match item {
            Outgoing::Text(frame, account) => {
                let len = frame.len();
                let sent = if queued.discard.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    stalled(session.text(frame)).await
                };
                queued.counter(account).fetch_sub(len, Ordering::Relaxed);
                sent
            }
            Outgoing::Binary(frame, account) => {
                let len = frame.len();
                let sent = if queued.discard.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    stalled(session.binary(frame)).await
                };
                queued.counter(account).fetch_sub(len, Ordering::Relaxed);
                sent
            }
            Outgoing::Ping => stalled(session.ping(b"")).await,
            Outgoing::Close(reason) => {
                let _ = tokio::time::timeout(WRITE_STALL, session.close(Some(reason))).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A socket write that gives up after [`WRITE_STALL`].
async fn stalled(
    write: impl std::future::Future<Output = Result<(), actix_ws::Closed>>,
) -> Result<(), actix_ws::Closed> {
    tokio::time::timeout(WRITE_STALL, write)
        .await
        .unwrap_or(Err(actix_ws::Closed))
}
