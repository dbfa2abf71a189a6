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

use actix::{Actor, Context, Handler, Recipient};
use tokio::sync::mpsc;

use super::messages::{Deliver, Reply, Unanswered};
use crate::cluster::{Channel, RelayFrame, SharedBus};
use crate::protocol::SessionId;

/// The outbox of one remote client: a subscriber like any other, as far as the session knows.
struct RemoteConn {
    conn: super::ConnId,
    out: mpsc::UnboundedSender<(super::ConnId, Deliver)>,
}

impl Actor for RemoteConn {
    type Context = Context<Self>;
}

impl Handler<Deliver> for RemoteConn {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _ctx: &mut Context<Self>) {
        let _ = self.out.send((self.conn.clone(), msg));
    }
}

struct RemoteClient {
    node: String,
    outbox: Recipient<Deliver>,
}

/// The remote clients of one owned session, and the relays they came through.
pub(super) struct RemoteClients {
    session: SessionId,
    bus: SharedBus,
    /// The lease epoch the out channel's frames are numbered under.
    epoch: i64,
    /// Started at the first remote client.
    out: Option<mpsc::UnboundedSender<(super::ConnId, Deliver)>>,
    clients: HashMap<super::ConnId, RemoteClient>,
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
    pub(super) fn outbox(
        &mut self,
        node: Option<&str>,
        conn: &super::ConnId,
    ) -> Recipient<Deliver> {
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
        .start()
        .recipient();
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
    pub(super) fn reply(&mut self, conn: &super::ConnId, reference: Option<String>) -> Reply {
        Reply::Conn {
            outbox: self.outbox(None, conn),
            reference,
            pending: self.unanswered.track(),
        }
    }

    pub(super) fn forget(&mut self, conn: &super::ConnId) {
        self.clients.remove(conn);
    }

    /// A relay's keepalive: returns its clients the owner has but the relay no longer has
    /// (their disconnect was lost on the bus).
    pub(super) fn keepalive(&mut self, node: &str, conns: &[super::ConnId]) -> Vec<super::ConnId> {
        self.heard.insert(node.to_owned(), Instant::now());
        let still: HashSet<&super::ConnId> = conns.iter().collect();
        self.clients
            .iter()
            .filter(|(conn, client)| client.node == node && !still.contains(conn))
            .map(|(conn, _)| conn.clone())
            .collect()
    }

    /// The clients of relays not heard from within `ttl`: their node is gone.
    pub(super) fn silent(&self, ttl: Duration) -> Vec<super::ConnId> {
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
fn spawn_out(
    bus: SharedBus,
    session: SessionId,
    epoch: i64,
) -> mpsc::UnboundedSender<(super::ConnId, Deliver)> {
    let (out, mut frames) = mpsc::unbounded_channel::<(super::ConnId, Deliver)>();
    tokio::spawn(async move {
        let channel = Channel::SessionOut(session);
        let mut seq = 0;
        while let Some((conn, deliver)) = frames.recv().await {
            seq += 1;
            let frame = RelayFrame {
                epoch,
                seq,
                conn,
                frame: deliver.frame.to_string(),
                class: deliver.class,
                ends_membership: deliver.ends_membership.is_some(),
            };
            if let Err(err) = bus.publish(&channel, frame.encode()).await {
                tracing::debug!(%err, "a frame for a relay was not published");
            }
        }
    });
    out
}
