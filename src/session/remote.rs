//! The owner's side of relays: the clients of this session that are connected to other nodes.
//!
//! Each such client is an ordinary subscriber of the [`SessionActor`](super::SessionActor), so
//! membership, presence, replay and slow-consumer rules are the same wherever it is connected.
//! Its outbox is a [`RemoteConn`], which hands every frame to the session's one out-channel task;
//! that task numbers the frames and publishes them in order on `…:s:{session}:out`, where the
//! client's relay picks them up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler, Recipient};
use tokio::sync::mpsc;

use super::ConnId;
use super::messages::{Deliver, DeliverBinary, FrameClass, Reply, Unanswered};
use crate::cluster::{Channel, RelayBody, RelayFrame, SharedBus};
use crate::protocol::SessionId;

type OutQueue = mpsc::UnboundedSender<(ConnId, Outgoing)>;

/// A frame for a remote client as the session sent it. Every copy of a broadcast shares its
/// bytes, so queueing one per client costs no copy; it becomes a [`RelayBody`] once per merged
/// frame.
#[derive(PartialEq)]
enum Outgoing {
    Text {
        frame: bytestring::ByteString,
        class: FrameClass,
        ends_membership: bool,
    },
    Binary {
        frame: bytes::Bytes,
        then_close: bool,
    },
}

impl From<Outgoing> for RelayBody {
    fn from(outgoing: Outgoing) -> Self {
        match outgoing {
            Outgoing::Text {
                frame,
                class,
                ends_membership,
            } => Self::Text {
                frame: frame.to_string(),
                class,
                ends_membership,
            },
            Outgoing::Binary { frame, then_close } => Self::Binary {
                frame: frame.to_vec(),
                then_close,
            },
        }
    }
}

/// The outbox of one remote client: a subscriber like any other, as far as the session knows,
/// native or Yjs.
struct RemoteConn {
    conn: ConnId,
    out: OutQueue,
}

impl Actor for RemoteConn {
    type Context = Context<Self>;
}

impl Handler<Deliver> for RemoteConn {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _ctx: &mut Context<Self>) {
        let body = Outgoing::Text {
            frame: msg.frame,
            class: msg.class,
            ends_membership: msg.ends_membership.is_some(),
        };
        let _ = self.out.send((self.conn.clone(), body));
    }
}

impl Handler<DeliverBinary> for RemoteConn {
    type Result = ();

    fn handle(&mut self, msg: DeliverBinary, _ctx: &mut Context<Self>) {
        let body = Outgoing::Binary {
            frame: msg.frame,
            then_close: msg.then_close,
        };
        let _ = self.out.send((self.conn.clone(), body));
    }
}

struct RemoteClient {
    node: String,
    outbox: Addr<RemoteConn>,
}

/// The remote clients of one owned session, and the relays they came through.
pub(super) struct RemoteClients {
    session: SessionId,
    bus: SharedBus,
    /// The lease epoch the out channel's frames are numbered under.
    epoch: i64,
    /// Started at the first remote client.
    out: Option<OutQueue>,
    clients: HashMap<ConnId, RemoteClient>,
    /// When each relay node last said it was alive.
    heard: HashMap<String, Instant>,
    /// Stands in for the connection's own count of unanswered requests, which lives on the
    /// relay's node (the relay applies its own backpressure).
    unanswered: Arc<Unanswered>,
}

impl RemoteClients {
    pub(super) fn new(session: SessionId, bus: SharedBus) -> Self {
        Self {
            session,
            bus,
            epoch: 0,
            out: None,
            clients: HashMap::new(),
            heard: HashMap::new(),
            unanswered: Arc::default(),
        }
    }

    /// The session loaded under lease `epoch`.
    pub(super) fn owned_under(&mut self, epoch: i64) {
        self.epoch = epoch;
    }

    /// The outbox of remote client `conn` of the relay on `node`, made on first use.
    pub(super) fn outbox(&mut self, node: Option<&str>, conn: &ConnId) -> Recipient<Deliver> {
        self.remote_conn(node, conn).recipient()
    }

    /// The outbox of remote Yjs client `conn` of the relay on `node`, made on first use.
    pub(super) fn binary_outbox(
        &mut self,
        node: Option<&str>,
        conn: &ConnId,
    ) -> Recipient<DeliverBinary> {
        self.remote_conn(node, conn).recipient()
    }

    fn remote_conn(&mut self, node: Option<&str>, conn: &ConnId) -> Addr<RemoteConn> {
        if let Some(node) = node {
            self.heard.insert(node.to_owned(), Instant::now());
        }
        if let Some(client) = self.clients.get_mut(conn) {
            if let Some(node) = node {
                node.clone_into(&mut client.node);
            }
            return client.outbox.clone();
        }
        let out = self
            .out
            .get_or_insert_with(|| spawn_out(self.bus.clone(), self.session.clone(), self.epoch))
            .clone();
        let outbox = RemoteConn {
            conn: conn.clone(),
            out,
        }
        .start();
        self.clients.insert(
            conn.clone(),
            RemoteClient {
                node: node.unwrap_or_default().to_owned(),
                outbox: outbox.clone(),
            },
        );
        outbox
    }

    /// Where the answer to a remote client's request goes: its outbox, in order with the rest.
    pub(super) fn reply(&mut self, conn: &ConnId, reference: Option<String>) -> Reply {
        Reply::Conn {
            outbox: self.outbox(None, conn),
            reference,
            pending: self.unanswered.track(),
        }
    }

    pub(super) fn forget(&mut self, conn: &ConnId) {
        self.clients.remove(conn);
    }

    /// A relay's keepalive: returns its clients the owner has but the relay no longer has
    /// (their disconnect was lost on the bus).
    pub(super) fn keepalive(&mut self, node: &str, conns: &[ConnId]) -> Vec<ConnId> {
        self.heard.insert(node.to_owned(), Instant::now());
        let still: HashSet<&ConnId> = conns.iter().collect();
        self.clients
            .iter()
            .filter(|(conn, client)| client.node == node && !still.contains(conn))
            .map(|(conn, _)| conn.clone())
            .collect()
    }

    /// The clients of relays not heard from within `ttl`: their node is gone.
    pub(super) fn silent(&self, ttl: Duration) -> Vec<ConnId> {
        self.clients
            .iter()
            .filter(|(_, client)| {
                self.heard
                    .get(&client.node)
                    .is_none_or(|heard| heard.elapsed() > ttl)
            })
            .map(|(conn, _)| conn.clone())
            .collect()
    }
}

/// The most frames the out task merges in one go.
const MERGE_WINDOW: usize = 256;

/// The out-channel task of one session: takes what the remote clients' outboxes queued, merges
/// the copies of each broadcast into one frame for all its clients ([`merge`]), numbers the
/// frames and publishes them, one at a time, so relays receive them in the session's order.
fn spawn_out(bus: SharedBus, session: SessionId, epoch: i64) -> OutQueue {
    let (out, mut queued) = mpsc::unbounded_channel::<(ConnId, Outgoing)>();
    tokio::spawn(async move {
        let channel = Channel::SessionOut(session);
        let mut seq = 0;
        while let Some(first) = queued.recv().await {
            let mut batch = vec![first];
            while batch.len() < MERGE_WINDOW
                && let Ok(next) = queued.try_recv()
            {
                batch.push(next);
            }
            for (conns, body) in merge(batch) {
                seq += 1;
                let frame = RelayFrame {
                    epoch,
                    seq,
                    conns,
                    body: body.into(),
                };
                if let Err(err) = bus.publish(&channel, frame.encode()).await {
                    tracing::debug!(%err, "a frame for relays was not published");
                }
            }
        }
    });
    out
}

/// Merges equal frames queued for different clients into one, keeping each client's frames in
/// the order they were queued. The outboxes run as separate actors, so one broadcast's copies
/// can interleave with the next's: `(1,A) (1,B) (2,A) (2,B)` becomes `({1,2},A) ({1,2},B)`.
/// A frame joins the first equal one placed after that client's previous frame.
fn merge<Body: PartialEq>(batch: Vec<(ConnId, Body)>) -> Vec<(Vec<ConnId>, Body)> {
    let mut merged: Vec<(Vec<ConnId>, Body)> = Vec::new();
    let mut last_of: HashMap<ConnId, usize> = HashMap::new();
    for (conn, body) in batch {
        let after = last_of.get(&conn).map_or(0, |&i| i + 1);
        let index = match merged[after.min(merged.len())..]
            .iter()
            .position(|(_, existing)| *existing == body)
        {
            Some(offset) => {
                merged[after + offset].0.push(conn.clone());
                after + offset
            }
            None => {
                merged.push((vec![conn.clone()], body));
                merged.len() - 1
            }
        };
        last_of.insert(conn, index);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::FrameClass;

    fn text(s: &str) -> RelayBody {
        RelayBody::Text {
            frame: s.to_owned(),
            class: FrameClass::Ordered,
            ends_membership: false,
        }
    }

    #[test]
    fn copies_of_a_broadcast_merge_and_each_clients_order_is_kept() {
        let (one, two): (ConnId, ConnId) = ("1".into(), "2".into());
        let batch = vec![
            (one.clone(), text("A")),
            (one.clone(), text("B")),
            (two.clone(), text("A")),
            (one.clone(), text("A")),
            (two.clone(), text("B")),
            (two.clone(), text("ack")),
        ];
        let merged: Vec<(Vec<String>, RelayBody)> = merge(batch)
            .into_iter()
            .map(|(conns, body)| (conns.iter().map(|c| c.to_string()).collect(), body))
            .collect();
        let ids = |ids: &[&str]| ids.iter().map(|id| (*id).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            merged,
            vec![
                (ids(&["1", "2"]), text("A")),
                (ids(&["1", "2"]), text("B")),
                // 1's second A must come after its B, so it cannot join the first A.
                (ids(&["1"]), text("A")),
                (ids(&["2"]), text("ack")),
            ]
        );
    }
}
