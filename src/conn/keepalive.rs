//! Keepalive: one timer per arbiter thread beats for every socket it serves, and tells each
//! one when the node is stopping.
//!
//! Each connection must be pinged now and then, and closed once it has been silent for the
//! socket timeout. A timer per connection (actix's `run_interval`) costs every idle socket a
//! boxed tokio `Sleep` and its interval, more than its share of the socket's own state; here a
//! thread keeps one list of weak addresses and one ticker that sends each a [`Beat`]. The list
//! forgets a connection once its actor is gone, and the ticker stops when the list is empty.
//!
//! The list is dealt into [`SLICES`] slices and each tick beats one of them, so that every
//! connection still hears once per period but the pings of ten thousand sockets are not written
//! in the same instant: that burst (and the pongs it brings back) held up live traffic behind
//! it for up to ~150 ms every period.
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

/// How many slices a thread's connections are dealt into; the ticker beats one per tick.
const SLICES: usize = 20;

/// One thread's watched connections, dealt round-robin into [`SLICES`] slices.
struct Watched<C> {
    slices: Vec<Vec<C>>,
    /// The slice the next new connection joins.
    joins: usize,
    /// The slice the next tick beats.
    due: usize,
}

impl<C> Default for Watched<C> {
    fn default() -> Self {
        Self {
            slices: std::iter::repeat_with(Vec::new).take(SLICES).collect(),
            joins: 0,
            due: 0,
        }
    }
}

impl<C> Watched<C> {
    /// Connections held in all slices, the dead not yet swept included. A thread's ticker runs
    /// exactly while this is above zero.
    fn len(&self) -> usize {
        self.slices.iter().map(Vec::len).sum()
    }

    /// Adds a connection; true when the ticker is not running and must be started.
    fn add(&mut self, conn: C) -> bool {
        self.slices[self.joins].push(conn);
        self.joins = (self.joins + 1) % SLICES;
        self.len() == 1
    }

    /// Offers `beat` to each connection of the slice that is due, and moves on to the next;
    /// `beat` returns false for a connection that is gone, which is dropped. Returns true while
    /// connections remain (false: the ticker stops).
    fn beat_due(&mut self, beat: impl FnMut(&C) -> bool) -> bool {
        let due = self.due;
        self.due = (due + 1) % SLICES;
        self.sweep(due, beat);
        self.len() > 0
    }

    /// Offers `beat` to every connection at once (the node is stopping).
    fn beat_all(&mut self, mut beat: impl FnMut(&C) -> bool) -> bool {
        for slice in 0..SLICES {
            self.sweep(slice, &mut beat);
        }
        self.len() > 0
    }

    fn sweep(&mut self, slice: usize, beat: impl FnMut(&C) -> bool) {
        let conns = &mut self.slices[slice];
        conns.retain(beat);
        // A burst of sockets that has since closed must not pin its slots.
        if conns.capacity() > 2 * conns.len() + 64 {
            conns.shrink_to_fit();
        }
    }
}

thread_local! {
    static WATCHED: RefCell<Watched<WeakRecipient<Beat>>> = RefCell::default();
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
    if WATCHED.with_borrow_mut(|watched| watched.add(conn)) {
        let every = Duration::from_secs((node.limits.socket_timeout_s / 3).max(1));
        actix::spawn(tick(every / SLICES as u32, node.stopping.0.subscribe()));
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

/// Beats one slice every `slice_every` (so each connection once per [`SLICES`] ticks), and
/// every connection at once when the node stops.
async fn tick(slice_every: Duration, mut stopping: watch::Receiver<bool>) {
    let mut interval =
        tokio::time::interval_at(tokio::time::Instant::now() + slice_every, slice_every);
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
        let send = |conn: &WeakRecipient<Beat>| match conn.upgrade() {
            Some(conn) => {
                conn.do_send(beat);
                true
            }
            None => false,
        };
        let ticking = WATCHED.with_borrow_mut(|watched| match beat {
            Beat::Due => watched.beat_due(send),
            Beat::NodeStopping => watched.beat_all(send),
        });
        if !ticking {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tick beats about a twentieth of the connections, and a full round beats each
    /// exactly once.
    #[test]
    fn a_round_of_ticks_beats_every_connection_once_a_slice_at_a_time() {
        let mut watched = Watched::default();
        assert!(watched.add(0), "the first connection starts the ticker");
        for conn in 1..1000 {
            assert!(!watched.add(conn), "the ticker is already running");
        }
        let mut beaten = vec![0; 1000];
        for _ in 0..SLICES {
            let mut this_tick = 0;
            assert!(watched.beat_due(|&conn| {
                beaten[conn] += 1;
                this_tick += 1;
                true
            }));
            assert_eq!(this_tick, 1000 / SLICES);
        }
        assert!(beaten.iter().all(|&n| n == 1), "{beaten:?}");
    }

    /// A connection that is gone is dropped when its slice comes round; once none is left the
    /// ticker stops, and the next connection starts it again.
    #[test]
    fn the_ticker_stops_when_every_connection_is_gone() {
        let mut watched = Watched::default();
        for conn in 0..(3 * SLICES) {
            watched.add(conn);
        }
        for _ in 0..SLICES - 1 {
            assert!(
                watched.beat_due(|_| false),
                "dead slices not yet swept remain"
            );
        }
        assert!(!watched.beat_due(|_| false));
        assert_eq!(watched.len(), 0);
        assert!(watched.add(7), "a new connection restarts it");
    }

    /// A stopping node reaches every connection in one pass.
    #[test]
    fn the_goodbye_reaches_every_slice_at_once() {
        let mut watched = Watched::default();
        for conn in 0..100 {
            watched.add(conn);
        }
        let mut told = 0;
        assert!(watched.beat_all(|_| {
            told += 1;
            true
        }));
        assert_eq!(told, 100);
    }
}
