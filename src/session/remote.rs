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
use super::messages::{Deliver, DeliverBinary, Reply, Unanswered};
use crate::cluster::{Channel, RelayBody, RelayFrame, SharedBus};
use crate::protocol::SessionId;

type OutQueue = mpsc::UnboundedSender<(ConnId, RelayBody)>;

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
        let body = RelayBody::Text {
            frame: msg.frame.to_string(),
            class: msg.class,
            ends_membership: msg.ends_membership.is_some(),
        };
        let _ = self.out.send((self.conn.clone(), body));
    }
}

impl Handler<DeliverBinary> for RemoteConn {
    type Result = ();

    fn handle(&mut self, msg: DeliverBinary, _ctx: &mut Context<Self>) {
        let body = RelayBody::Binary {
            frame: msg.frame.to_vec(),
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

/// The out-channel task of one session: numbers each frame and publishes it, one at a time, so
/// relays receive them in the order the session sent them.
fn spawn_out(bus: SharedBus, session: SessionId, epoch: i64) -> OutQueue {
    let (out, mut frames) = mpsc::unbounded_channel::<(ConnId, RelayBody)>();
    tokio::spawn(async move {
        let channel = Channel::SessionOut(session);
        let mut seq = 0;
        while let Some((conn, body)) = frames.recv().await {
            seq += 1;
            let frame = RelayFrame {
                epoch,
                seq,
                conn,
                body,
            };
            if let Err(err) = bus.publish(&channel, frame.encode()).await {
                tracing::debug!(%err, "a frame for a relay was not published");
            }
        }
    });
    out
}
