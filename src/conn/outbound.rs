//! A connection's outbound queue: bounded in bytes, drained to the socket by one writer.
//!
//! The connection actor must never wait on a socket, so frames go into this queue and the
//! connection's writer ([`Outbound::open`]) encodes them in order, gathering whatever is queued
//! into one write. The queue counts the bytes it holds, live frames and replayed history apart:
//! when a live frame would push it past its bound, presence is shed and anything else marks the
//! client a slow consumer; replay has its own, larger allowance so a client that fell behind can
//! catch up. A slow consumer's queued frames are discarded and it gets a close frame (1013), so
//! a stalled reader costs at most the bounds, never unbounded memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use futures_channel::mpsc;

use super::socket::{CloseCode, CloseReason, FrameWriter, Pongs};
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
    Pong(bytes::Bytes, Account),
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

/// The sending half, owned by the connection actor (and a clone by its socket reader, which
/// queues the pongs that answer pings).
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<Queued>,
    limit: usize,
}

/// How long one write may wait for the client to read before the socket is given up. It also
/// bounds how long a writer outlives its connection actor while flushing a close frame.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// The most bytes gathered from the queue into one write.
const GATHER_BYTES: usize = 64 * 1024;

impl Outbound {
    /// A queue of at most `limit` live bytes, and the writer that drains it into `writer`. The
    /// writer runs until the connection ends (every `Outbound` dropped, a close frame flushed,
    /// or a write failed or stalled); whoever serves the connection spawns it, and the socket
    /// is closed when it ends.
    pub fn open(writer: FrameWriter, limit: usize) -> (Self, impl Future<Output = ()>) {
        // futures' channel rather than tokio's: tokio's allocates a block of 32 slots up front,
        // more than an idle socket costs in all.
        let (tx, rx) = mpsc::unbounded();
        let queued = Arc::new(Queued::default());
        let outbound = Self {
            tx,
            queued: queued.clone(),
            limit,
        };
        (outbound, write_loop(writer, rx, queued))
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
        if self.tx.unbounded_send(item(account)).is_err() {
            return Pushed::Closed;
        }
        Pushed::Queued
    }

    pub fn ping(&self) {
        let _ = self.tx.unbounded_send(Outgoing::Ping);
    }

    /// Queues a close frame after everything already queued.
    pub fn close(&self, code: CloseCode, description: &str) {
        let _ = self.tx.unbounded_send(Outgoing::Close(CloseReason {
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
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<Queued>,
) {
    while let Ok(mut item) = rx.recv().await {
        // Gather what is queued, up to GATHER_BYTES, into one write.
        let drained = loop {
            match encode(&mut writer, item, &queued) {
                Ok(Written::Frame) => {}
                Ok(Written::Close) => {
                    let _ = Box::pin(writer.shutdown(WRITE_STALL)).await;
                    return;
                }
                Err(err) => {
                    tracing::debug!(%err, "cannot encode an outbound frame; closing");
                    return;
                }
            }
            if writer.buffered() >= GATHER_BYTES {
                break false;
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break true,
            }
        };
        // With nothing else queued the socket may go quiet for long: free the buffer. A write
        // that must wait is boxed, so that its timer is held only while the client is behind,
        // not in every idle socket's writer.
        let flushed = match writer.write_now(drained) {
            Ok(true) => Ok(()),
            Ok(false) => Box::pin(writer.write_rest(drained, WRITE_STALL)).await,
            Err(err) => Err(err),
        };
        if flushed.is_err() {
            return;
        }
    }
}

/// What [`encode`] put into the writer's buffer.
enum Written {
    Frame,
    /// A close frame: the connection ends once it is flushed.
    Close,
}

impl Outgoing {
    /// The bytes this item holds against its account, if it is charged to one.
    fn charge(&self) -> Option<(usize, Account)> {
        match self {
            Self::Text(frame, account) => Some((frame.len(), *account)),
            Self::Binary(frame, account) | Self::Pong(frame, account) => {
                Some((frame.len(), *account))
            }
            Self::Ping | Self::Close(_) => None,
        }
    }
}

/// Encodes one queued item, releasing its bytes from the queue's count. After a slow consumer
/// is dropped, charged frames are skipped; pings and the close frame still go out.
fn encode(writer: &mut FrameWriter, item: Outgoing, queued: &Queued) -> std::io::Result<Written> {
    if let Some((len, account)) = item.charge() {
        queued.counter(account).fetch_sub(len, Ordering::Relaxed);
        if queued.discard.load(Ordering::Relaxed) {
            return Ok(Written::Frame);
        }
    }
    match item {
        Outgoing::Text(frame, _) => writer.text(frame),
        Outgoing::Binary(frame, _) => writer.binary(frame),
        Outgoing::Pong(payload, _) => writer.pong(payload),
        Outgoing::Ping => writer.ping(),
        Outgoing::Close(reason) => return writer.close(reason).map(|()| Written::Close),
    }
    .map(|()| Written::Frame)
}

impl Pongs for Outbound {
    /// A pong is shed, like presence, when the client is not reading what it is sent.
    fn pong(&self, payload: bytes::Bytes) {
        let len = payload.len();
        let _ = self.push(len, FrameClass::Presence, |account| {
            Outgoing::Pong(payload, account)
        });
    }
}
