//! The typed messages a [`SessionActor`](super::SessionActor) accepts, and the frames it sends
//! back to connections.
//!
//! Replies to socket clients go through the connection's outbox, the same channel as broadcasts,
//! so a client sees its `ack` and every later change in the session's commit order. REST callers
//! get theirs on a oneshot channel instead; [`Reply`] hides the difference.

use std::sync::Arc;

use actix::{Message, Recipient};
use bytestring::ByteString;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::protocol::frames::{DocSummary, ServerFrame};
use crate::protocol::{DocName, Refusal, SessionId, UserInfo};
use crate::session::log::Actor;
use crate::session::ot::Component;

/// A connection's id, as sent in `welcome` and presence frames.
pub type ConnId = Arc<str>;

/// How urgent a frame is when a client falls behind: presence may be dropped, the rest may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameClass {
    /// Ordered frames: acks, events, joined, reset. Never dropped; a client that cannot keep up
    /// with them is disconnected and resumes from its offset.
    Ordered,
    /// Presence: superseded by the next update, so shedding it under pressure loses nothing.
    Presence,
    /// Replayed history after a join: allowed past the queue bound, up to the replay budget
    /// (`REPLAY_BUDGET_FACTOR` times it), so a client that fell behind can catch up. A replay
    /// larger than the budget is replaced by `reset` before it is sent.
    Replay,
}

/// How many outbound-queue bounds one replay may occupy.
pub const REPLAY_BUDGET_FACTOR: usize = 4;

/// One encoded frame for a connection to write to its socket.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The encoded frame; cloning shares the bytes, so a broadcast encodes once.
    pub frame: ByteString,
    pub class: FrameClass,
    /// Set on the last frame a session sends a connection (`archived`): the connection forgets
    /// its membership, so later requests are answered as "not joined".
    pub ends_membership: Option<SessionId>,
}

impl Deliver {
    pub fn ordered(frame: ByteString) -> Self {
        Self::new(frame, FrameClass::Ordered)
    }

    pub fn new(frame: ByteString, class: FrameClass) -> Self {
        Self {
            frame,
            class,
            ends_membership: None,
        }
    }
}

/// A connection's count of requests sent to sessions and not answered yet. The connection stops
/// reading its socket while the count is high, so a client that sends faster than its sessions
/// commit is slowed down by TCP instead of queueing unbounded work in the server.
#[derive(Default)]
pub struct Unanswered {
    count: std::sync::atomic::AtomicUsize,
    answered: tokio::sync::Notify,
}

impl Unanswered {
    /// Counts one more request until the returned guard drops.
    pub fn track(self: &Arc<Self>) -> PendingGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        PendingGuard(Arc::clone(self))
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once fewer than `below` requests are unanswered.
    pub async fn wait_below(self: Arc<Self>, below: usize) {
        loop {
            let answered = self.answered.notified();
            if self.count() < below {
                return;
            }
            answered.await;
        }
    }
}

/// One unanswered request; dropping it (with the reply) answers it.
pub struct PendingGuard(Arc<Unanswered>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.answered.notify_waiters();
    }
}

/// What a write request returns once committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The offset of the event the request appended, if it appended one.
    pub offset: Option<u64>,
    /// The document and its version after an edit.
    pub doc: Option<(DocName, u64)>,
}

impl Committed {
    pub fn offset(offset: u64) -> Self {
        Self {
            offset: Some(offset),
            doc: None,
        }
    }

    pub fn doc(doc: DocName, version: u64) -> Self {
        Self {
            offset: None,
            doc: Some((doc, version)),
        }
    }
}

/// Where the answer to one request goes.
pub enum Reply {
    /// A socket client: the answer is an `ack` or `error` frame with the request's `ref`.
    Conn {
        outbox: Recipient<Deliver>,
        reference: Option<String>,
        /// Counts the request as unanswered until the reply is sent (or dropped).
        pending: PendingGuard,
    },
    /// A REST handler awaiting the outcome.
    Http(oneshot::Sender<Result<Committed, Refusal>>),
}

impl Reply {
    /// A reply channel for a REST handler, and the receiver it awaits.
    pub fn http() -> (Self, oneshot::Receiver<Result<Committed, Refusal>>) {
        let (tx, rx) = oneshot::channel();
        (Self::Http(tx), rx)
    }

    pub fn ok(self, committed: Committed) {
        match self {
            Self::Conn {
                outbox, reference, ..
            } => outbox.do_send(Deliver::ordered(
                ServerFrame::Ack {
                    reference: reference.as_deref(),
                    offset: committed.offset,
                    doc: committed.doc.as_ref().map(|(doc, _)| doc),
                    version: committed.doc.as_ref().map(|(_, version)| *version),
                    task: None,
                    council: None,
                }
                .encode(),
            )),
            Self::Http(tx) => {
                // The handler may have given up (client gone); the commit stands regardless.
                let _ = tx.send(Ok(committed));
            }
        }
    }

    /// The `ref` of a socket client's request whose answer comes from elsewhere: the session's
    /// owner on another node, through its relay. An HTTP reply, which no relay can carry back,
    /// is handed back.
    pub fn into_reference(self) -> Result<Option<String>, Self> {
        match self {
            Self::Conn { reference, .. } => Ok(reference),
            http @ Self::Http(_) => Err(http),
        }
    }

    pub fn refuse(self, refusal: Refusal) {
        match self {
            Self::Conn {
                outbox, reference, ..
            } => outbox.do_send(Deliver::ordered(
                ServerFrame::error(reference.as_deref(), &refusal).encode(),
            )),
            Self::Http(tx) => {
                let _ = tx.send(Err(refusal));
            }
        }
    }
}

/// A connection subscribes to the session. The `joined` frame, any replay and every later change
/// arrive through `outbox`, in order. An `Err` means nothing was joined and nothing was sent.
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct Join {
    pub conn: ConnId,
    pub user: Arc<UserInfo>,
    pub outbox: Recipient<Deliver>,
    pub reference: Option<String>,
    /// The last offset the client saw, for replay.
    pub since: Option<u64>,
    /// The epoch that offset belongs to.
    pub epoch: Option<String>,
}

/// A connection unsubscribes; it gets an `ack`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub conn: ConnId,
    pub reply: Reply,
}

/// A connection went away without leaving.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub conn: ConnId,
}

/// A chat message to append to the log. `conn` is `None` for REST, which needs no membership.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PostChat {
    pub conn: Option<ConnId>,
    pub actor: Actor,
    pub text: String,
    pub reply: Reply,
}

/// An event from elsewhere in the node (the scheduler's `task.*` transitions) to append to the
/// log. Nobody awaits it: the transition it records is already durable in its own table.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AppendEvent {
    pub event: crate::session::log::NewEvent,
}

/// A JSON edit of a document: `ops` written against version `base`. `conn` is `None` for
/// REST. The reply is an ack with the new version once committed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Edit {
    pub conn: Option<ConnId>,
    pub actor: Actor,
    pub doc: DocName,
    pub base: u64,
    pub ops: Vec<Component>,
    pub reply: Reply,
}

/// The committed state of one document (version 0 and empty if it does not exist yet).
#[derive(Message)]
#[rtype(result = "Result<DocSummary, Refusal>")]
pub struct ReadDoc {
    pub doc: DocName,
}

/// A connection's new presence state, broadcast coalesced.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPresence {
    pub conn: ConnId,
    /// Opaque user data: relayed, never inspected.
    pub state: Box<RawValue>,
    /// Where to send an error if the connection has not joined.
    pub outbox: Recipient<Deliver>,
}

/// The live view of a session for REST: who is here, and its documents.
#[derive(Message)]
#[rtype(result = "LiveView")]
pub struct Inspect;

/// What [`Inspect`] returns.
#[derive(Debug, Clone, Default)]
pub struct LiveView {
    pub members: Vec<UserInfo>,
    pub docs: Vec<DocSummary>,
}

/// Resolves once every write the session has accepted is committed (or refused). Sent at
/// shutdown, before the process exits.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// The session was archived: subscribers are told, and the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Archive;

/// One binary y-websocket frame for a Yjs connection to write.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DeliverBinary {
    pub frame: bytes::Bytes,
    /// Close the socket after this frame (the session moved to another node): the client
    /// reconnects and resyncs by state vector, sending whatever this node did not commit.
    pub then_close: bool,
}

/// A Yjs connection subscribes to one document. The server's sync step 1 and the current
/// awareness states arrive through `outbox`.
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct YjsAttach {
    pub conn: ConnId,
    pub user: Arc<UserInfo>,
    pub doc: DocName,
    pub outbox: Recipient<DeliverBinary>,
}

/// A Yjs client's sync step 1: it is answered with step 2 once the document has no
/// uncommitted change, so it never receives state a crash could take back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct YjsSyncStep1 {
    pub conn: ConnId,
    pub state_vector: yrs::StateVector,
}

/// A Yjs client's update (sync step 2 or an incremental update), applied through the group
/// commit like any edit.
#[derive(Message)]
#[rtype(result = "()")]
pub struct YjsUpdate {
    pub conn: ConnId,
    pub data: Vec<u8>,
}

/// A Yjs client's awareness update, relayed to the document's other Yjs clients.
#[derive(Message)]
#[rtype(result = "()")]
pub struct YjsAwareness {
    pub conn: ConnId,
    pub update: yrs::sync::awareness::AwarenessUpdate,
}

/// A Yjs client asks for every awareness state.
#[derive(Message)]
#[rtype(result = "()")]
pub struct YjsAwarenessQuery {
    pub conn: ConnId,
}

/// The owner's heartbeat, from [`SessionRegistry::keep_leases`](super::SessionRegistry): the
/// epochs of every session lease the store still gives this node, as of `as_of`. A live session
/// whose lease is missing or newer was taken over, and stops serving.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeasesRenewed {
    pub held: Arc<std::collections::HashMap<SessionId, i64>>,
    pub as_of: std::time::Instant,
}

/// The connections of a session actor that crashed, handed to its successor: they stay open,
/// and each gets a `reset` and a fresh snapshot from the restarted session.
#[derive(Message, Default)]
#[rtype(result = "()")]
pub struct Reattach {
    pub conns: Vec<(ConnId, Arc<UserInfo>, Recipient<Deliver>)>,
    pub yjs: Vec<(ConnId, Arc<UserInfo>, DocName, Recipient<DeliverBinary>)>,
}

/// Makes the session actor panic, to test supervision (`fault-injection` builds only).
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectPanic;
