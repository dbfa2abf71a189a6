//! Keepalive: one timer per arbiter thread beats for every socket it serves, and tells each
//! one when the node is stopping.
//!
//! Each connection must be pinged now and then, and closed once it has been silent for the
//! socket timeout. A timer per connection (actix's `run_interval`) costs every idle socket a
//! boxed tokio `Sleep` and its interval, more than its share of the socket's own state; here a
//! thread keeps one list of weak addresses and one ticker that sends each a [`Beat`]. The list
//! forgets a connection once its actor is gone, and the ticker stops when the list is empty.
//!
//! The same list is how a stopping node says goodbye: [`Stopping::begin`] wakes every thread's
//! ticker, which sends each of its sockets [`Beat::NodeStopping`], and each closes with 1001 and
//! [`STOPPING`], so clients see a deliberate close they can reconnect after rather than a reset.

use std::cell::RefCell;
use std::time::Duration;

use actix::{Message, WeakRecipient};
use tokio::sync::watch;

use super::outbound::Outbound;
use crate::node::Node;

/// Why a socket that has been silent too long is closed.
pub const SILENT: &str = "no traffic within the socket timeout";

/// Why every socket is closed when the node shuts down.
pub const STOPPING: &str = "the server is shutting down";

/// What the keepalive asks of a connection.
#[derive(Message, Clone, Copy, PartialEq, Eq, Debug)]
#[rtype(result = "()")]
pub enum Beat {
    /// Ping the client, or close the socket if it has been silent too long.
    Due,
    /// The node is shutting down: close with 1001 and [`STOPPING`].
    NodeStopping,
}

/// The node's "shutting down" flag, which every keepalive ticker watches.
pub struct Stopping(watch::Sender<bool>);

impl Default for Stopping {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl Stopping {
    /// Tells every socket of the node to close (see the module doc).
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

#[derive(Default)]
struct Watched {
    conns: Vec<WeakRecipient<Beat>>,
    ticking: bool,
}

thread_local! {
    static WATCHED: RefCell<Watched> = RefCell::default();
}

/// Sends `conn` a [`Beat::Due`] every third of the node's socket timeout (at least a second),
/// and [`Beat::NodeStopping`] when the node stops, for as long as its actor lives. Must be
/// called on an arbiter.
pub fn watch(conn: WeakRecipient<Beat>, node: &Node) {
    if node.stopping.is_set()
        && let Some(conn) = conn.upgrade()
    {
        // Accepted just before the listener paused: it is told at once.
        conn.do_send(Beat::NodeStopping);
    }
    let start = WATCHED.with_borrow_mut(|watched| {
        watched.conns.push(conn);
        !std::mem::replace(&mut watched.ticking, true)
    });
    if start {
        let every = Duration::from_secs((node.limits.socket_timeout_s / 3).max(1));
        actix::spawn(tick(every, node.stopping.0.subscribe()));
    }
}

/// What a [`Beat`] asks of a connection last heard at `last_heard`: a ping if it was heard
/// within `timeout` (returns true), else nothing (false): the caller closes it with [`SILENT`].
pub fn ping_if_alive(
    outbound: &Outbound,
    last_heard: std::time::Instant,
    timeout: Duration,
) -> bool {
    let alive = last_heard.elapsed() <= timeout;
    if alive {
        outbound.ping();
    }
    alive
}

async fn tick(every: Duration, mut stopping: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The flag is only ever set, so a change is the node stopping; it is told once, and after
    // that (or once the node is gone) only the interval wakes the ticker.
    let mut told = *stopping.borrow();
    loop {
        let beat = tokio::select! {
            _ = interval.tick() => Beat::Due,
            changed = stopping.changed(), if !told => {
                told = true;
                if changed.is_err() {
                    continue;
                }
                Beat::NodeStopping
            }
        };
        let done = WATCHED.with_borrow_mut(|watched| {
            watched.conns.retain(|conn| match conn.upgrade() {
                Some(conn) => {
                    conn.do_send(beat);
                    true
                }
                None => false,
            });
            // A burst of sockets that has since closed must not pin its slots.
            if watched.conns.capacity() > 2 * watched.conns.len() + 64 {
                watched.conns.shrink_to_fit();
            }
            watched.ticking = !watched.conns.is_empty();
            !watched.ticking
        });
        if done {
            return;
        }
    }
}
