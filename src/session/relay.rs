//! `SessionRelay`: how a node serves clients of a session that another node owns.
//!
//! A session actor that finds the session's lease held by another node, on a cluster with a
//! Redis bus, becomes the session's relay on this node instead of refusing. It forwards each
//! client command to the owner on `…:s:{session}:in` (in order, through one publisher) and hands
//! each [`RelayFrame`] the owner publishes on `…:s:{session}:out` to the client it is for. The
//! owner applies, commits and answers exactly as for its own clients, so an `ack` still means
//! committed by the owner, and each client sees one order: the owner's.
//!
//! What a relay cannot repair it hands back to the client, which resumes from its offset (the
//! owner replays from its log):
//! - **a hole** in the out channel's sequence numbers, or a bus outage: frames were lost;
//! - **a new owner** (the lease moved, or lapsed): the client joins again, wherever the session
//!   now lives.
//!
//! Both end a native client's membership with a `conflict` error, as a deposed owner does, and
//! close a Yjs socket, whose client resyncs by state vector when it reconnects.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::Recipient;

use super::ConnId;
use super::messages::{Deliver, DeliverBinary, FrameClass, Join, YjsAttach};
use crate::cluster::{Channel, OrderedPublisher, RelayBody, RelayFrame, SharedBus, ToOwner};
use crate::protocol::UserInfo;
use crate::protocol::frames::ServerFrame;
use crate::protocol::{ErrorCode, Refusal, SessionId};

/// How long a join may wait for the owner's first frame before it is sent again (the owner may
/// not have been listening yet when it was first sent).
const JOIN_RESEND: Duration = Duration::from_secs(1);

/// How long a client that left is still sent its frames (its `leave` ack is on the way).
const LEAVE_GRACE: Duration = Duration::from_secs(5);

/// A frame of the owner, ready to hand to any number of local clients.
enum Body {
    Text(bytestring::ByteString, FrameClass, bool),
    Binary(bytes::Bytes, bool),
}

/// Where a local client's frames go: a `/v1/ws` client or a Yjs socket.
enum Outbox {
    Native(Recipient<Deliver>),
    Yjs(Recipient<DeliverBinary>),
}

struct LocalClient {
    outbox: Outbox,
    /// The join as sent, until the owner's first frame for the client arrives.
    unanswered_join: Option<(Instant, ToOwner)>,
    left_at: Option<Instant>,
}

/// A relay's state: its clients, and where it is in the owner's out channel.
pub(super) struct Relay {
    session: SessionId,
    node: String,
    owner: String,
    to_owner: OrderedPublisher,
    bus: SharedBus,
    clients: HashMap<ConnId, LocalClient>,
    /// The `(epoch, seq)` of the last frame seen on the out channel.
    last: Option<(i64, u64)>,
    /// The bus's outage count when the relay started listening.
    outages: u64,
}

impl Relay {
    /// A relay of `session` on `node` for the owner `owner`. The caller has subscribed to the
    /// out channel already, so no frame for a client of this relay can be missed.
    pub(super) fn new(session: SessionId, node: String, owner: String, bus: SharedBus) -> Self {
        Self {
            to_owner: OrderedPublisher::start(bus.clone(), Channel::SessionIn(session.clone())),
            outages: bus.outages(),
            session,
            node,
            owner,
            bus,
            clients: HashMap::new(),
            last: None,
        }
    }

    pub(super) fn owner(&self) -> &str {
        &self.owner
    }

    pub(super) fn is_idle(&self) -> bool {
        self.clients.is_empty()
    }

    /// Sends a client's command to the owner.
    pub(super) fn forward(&self, command: &ToOwner) {
        self.to_owner.publish(command.encode());
    }

    pub(super) fn join(&mut self, msg: Join) {
        let command = ToOwner::Join {
            node: self.node.clone(),
            conn: msg.conn.clone(),
            user: UserInfo::clone(&msg.user),
            reference: msg.reference,
            since: msg.since,
            epoch: msg.epoch,
        };
        self.add_client(msg.conn, Outbox::Native(msg.outbox), command);
    }

    /// A Yjs client opens a document; the owner answers with its sync step 1.
    pub(super) fn attach_yjs(&mut self, msg: YjsAttach) {
        let command = ToOwner::YjsAttach {
            node: self.node.clone(),
            conn: msg.conn.clone(),
            user: UserInfo::clone(&msg.user),
            doc: msg.doc,
        };
        self.add_client(msg.conn, Outbox::Yjs(msg.outbox), command);
    }

    fn add_client(&mut self, conn: ConnId, outbox: Outbox, join: ToOwner) {
        self.forward(&join);
        self.clients.insert(
            conn,
            LocalClient {
                outbox,
                unanswered_join: Some((Instant::now(), join)),
                left_at: None,
            },
        );
    }

    /// A client leaves; it still gets the owner's `ack` (or error) for it.
    pub(super) fn leave(&mut self, conn: ConnId, reference: Option<String>) {
        if let Some(client) = self.clients.get_mut(&conn) {
            client.left_at = Some(Instant::now());
        }
        self.forward(&ToOwner::Leave { conn, reference });
    }

    pub(super) fn disconnect(&mut self, conn: ConnId) {
        if self.clients.remove(&conn).is_some() {
            self.forward(&ToOwner::Disconnect { conn });
        }
    }

    /// Whether `conn` is a client of this relay (joined and not left).
    pub(super) fn has_client(&self, conn: &ConnId) -> bool {
        self.clients
            .get(conn)
            .is_some_and(|client| client.left_at.is_none())
    }

    /// Hands one frame of the owner to those of its clients that are this relay's. A hole in
    /// the sequence means frames were lost: every client is sent back to resume instead.
    pub(super) fn deliver(&mut self, frame: RelayFrame) {
        let hole =
            matches!(self.last, Some((epoch, seq)) if epoch == frame.epoch && frame.seq != seq + 1);
        self.last = Some((frame.epoch, frame.seq));
        if hole {
            tracing::warn!(session = %self.session, seq = frame.seq, "frames from the owner were lost; clients resume from their offsets");
            // The outage that lost them is answered here: `tick` must not end the clients'
            // new memberships for it again. (The bus counts it before routing anything after.)
            self.outages = self.bus.outages();
            return self.end_all("frames from its owner were lost on the cluster bus");
        }
        // Converted once; each client's copy shares the bytes.
        let body = match frame.body {
            RelayBody::Text {
                frame,
                class,
                ends_membership,
            } => Body::Text(frame.into(), class, ends_membership),
            RelayBody::Binary { frame, then_close } => Body::Binary(frame.into(), then_close),
        };
        for conn in &frame.conns {
            let Some(client) = self.clients.get_mut(conn) else {
                continue; // a client of another relay
            };
            client.unanswered_join = None;
            let ends = match (&body, &client.outbox) {
                (Body::Text(text, class, ends), Outbox::Native(outbox)) => {
                    outbox.do_send(Deliver {
                        frame: text.clone(),
                        class: *class,
                        ends_membership: ends.then(|| self.session.clone()),
                    });
                    *ends
                }
                (Body::Binary(bytes, then_close), Outbox::Yjs(outbox)) => {
                    outbox.do_send(DeliverBinary {
                        frame: bytes.clone(),
                        then_close: *then_close,
                    });
                    *then_close
                }
                _ => {
                    tracing::warn!(session = %self.session, %conn, "a frame of the wrong kind for its client was dropped");
                    false
                }
            };
            if ends {
                self.clients.remove(conn);
            }
        }
    }

    /// Every third of the lease TTL: says the relay is alive, sends again joins the owner has
    /// not answered, forgets clients that left, and ends every membership if the bus was down
    /// meanwhile (whatever the owner published then is lost).
    pub(super) fn tick(&mut self) {
        let outages = self.bus.outages();
        if outages != self.outages {
            self.outages = outages;
            // Numbering starts over for this relay: the next frame is not compared with one
            // from before the outage, or the same loss would end the new memberships too.
            self.last = None;
            return self.end_all("the cluster bus was down, and frames from its owner may be lost");
        }
        self.clients.retain(|_, client| {
            client
                .left_at
                .is_none_or(|left| left.elapsed() < LEAVE_GRACE)
        });
        for client in self.clients.values_mut() {
            if let Some((sent, join)) = &mut client.unanswered_join
                && sent.elapsed() >= JOIN_RESEND
            {
                *sent = Instant::now();
                self.to_owner.publish(join.encode());
            }
        }
        self.forward(&ToOwner::Keepalive {
            node: self.node.clone(),
            conns: self.clients.keys().cloned().collect(),
        });
    }

    /// Ends every client's membership with a `conflict` error saying `why`: each joins again
    /// with its last offset, and the owner replays what it missed.
    pub(super) fn end_all(&mut self, why: &str) {
        let refusal = Refusal::new(
            ErrorCode::Conflict,
            format!(
                "session {}: {why}; join it again with your last offset",
                self.session
            ),
        );
        let error = ServerFrame::error(None, &refusal).encode();
        for (conn, client) in self.clients.drain() {
            match client.outbox {
                Outbox::Native(outbox) => outbox.do_send(Deliver {
                    ends_membership: Some(self.session.clone()),
                    ..Deliver::new(error.clone(), FrameClass::Ordered)
                }),
                // A Yjs socket is closed; its client resyncs by state vector on reconnect.
                Outbox::Yjs(outbox) => outbox.do_send(DeliverBinary {
                    frame: bytes::Bytes::new(),
                    then_close: true,
                }),
            }
            self.to_owner.publish(ToOwner::Disconnect { conn }.encode());
        }
    }
}
