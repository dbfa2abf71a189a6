//! Keepalive: one timer per arbiter thread beats for every socket it serves.
//!
//! Each connection must be pinged now and then, and closed once it has been silent for the
//! socket timeout. A timer per connection (actix's `run_interval`) costs every idle socket a
//! boxed tokio `Sleep` and its interval, more than its share of the socket's own state; here a
//! thread keeps one list of weak addresses and one ticker that sends each a [`Beat`]. The list
//! forgets a connection once its actor is gone, and the ticker stops when the list is empty.

use std::cell::RefCell;
use std::time::Duration;

use actix::{Message, WeakRecipient};

use super::outbound::Outbound;

/// Why a socket that has been silent too long is closed.
pub const SILENT: &str = "no traffic within the socket timeout";

/// Time to ping the client, or to close the socket if it has been silent too long.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Beat;

#[derive(Default)]
struct Watched {
    conns: Vec<WeakRecipient<Beat>>,
    ticking: bool,
}

thread_local! {
    static WATCHED: RefCell<Watched> = RefCell::default();
}

/// Sends `conn` a [`Beat`] every `every` (the first ticker on a thread sets its period) for as
/// long as its actor lives. Must be called on an arbiter.
pub fn watch(conn: WeakRecipient<Beat>, every: Duration) {
    let start = WATCHED.with_borrow_mut(|watched| {
        watched.conns.push(conn);
        !std::mem::replace(&mut watched.ticking, true)
    });
    if start {
        actix::spawn(tick(every));
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

async fn tick(every: Duration) {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let done = WATCHED.with_borrow_mut(|watched| {
            watched.conns.retain(|conn| match conn.upgrade() {
                Some(conn) => {
                    conn.do_send(Beat);
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
