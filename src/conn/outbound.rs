//! A connection's outbound queue: bounded in bytes, drained to the socket by one writer task.
//!
//! actix-ws sends through a small channel whose `send` waits when the client does not read. The
//! connection actor must never wait on that, so frames go into this queue and a local task
//! writes them in order. The queue counts the bytes it holds; when a frame would push it past its
//! bound, presence is shed and anything else marks the client a slow consumer, which the caller
//! disconnects. A stalled reader therefore costs at most the bound, never unbounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_ws::{CloseCode, CloseReason, Session};
use bytestring::ByteString;
use tokio::sync::mpsc;

use crate::session::FrameClass;

enum Outgoing {
    Text(ByteString),
    Binary(bytes::Bytes),
    Ping,
    Close(CloseReason),
}

/// What [`Outbound::push`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A presence frame was dropped because the client is behind.
    Shed,
    /// The client is too far behind: the caller must disconnect it.
    SlowConsumer,
    /// The writer has stopped: the socket is gone.
    Closed,
}

/// The sending half, owned by the connection actor.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    writer: tokio::task::AbortHandle,
}

/// How long one write may wait for the client to read before the socket is given up. It also
/// bounds how long a writer outlives its connection actor while flushing a close frame.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

impl Outbound {
    /// Starts the writer task for `session` on the current arbiter. The task outlives the
    /// connection actor just long enough to flush a final close frame.
    pub fn start(session: Session, limit: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = actix::spawn(write_loop(session, rx, queued.clone())).abort_handle();
        Self {
            tx,
            queued,
            limit,
            writer,
        }
    }

    pub fn push_text(&self, frame: ByteString, class: FrameClass) -> Pushed {
        let len = frame.len();
        self.push(len, class, Outgoing::Text(frame))
    }

    pub fn push_binary(&self, frame: bytes::Bytes, class: FrameClass) -> Pushed {
        let len = frame.len();
        self.push(len, class, Outgoing::Binary(frame))
    }

    fn push(&self, len: usize, class: FrameClass, item: Outgoing) -> Pushed {
        let queued = self.queued.load(Ordering::Relaxed);
        if queued + len > self.limit && queued > 0 {
            return match class {
                FrameClass::Presence => Pushed::Shed,
                FrameClass::Ordered => Pushed::SlowConsumer,
            };
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(item).is_err() {
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

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Stops writing at once: for a client that does not read, whose queue may never drain.
    pub fn abort(&self) {
        self.writer.abort();
    }
}

async fn write_loop(
    mut session: Session,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(item) = rx.recv().await {
        let sent = match item {
            Outgoing::Text(frame) => {
                let len = frame.len();
                let sent = stalled(session.text(frame)).await;
                queued.fetch_sub(len, Ordering::Relaxed);
                sent
            }
            Outgoing::Binary(frame) => {
                let len = frame.len();
                let sent = stalled(session.binary(frame)).await;
                queued.fetch_sub(len, Ordering::Relaxed);
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
