//! Giving freed memory back to the operating system after a burst of churn.
//!
//! glibc's allocator keeps freed pages in its arenas, so without a nudge a node's resident
//! memory stays at its high-water mark after thousands of sessions passivate, or after a wave of
//! sockets joined and their join broadcasts were written and freed (a quarter of the resident
//! memory of 19,000 idle sockets was such free pages). The trimmer asks glibc to release them
//! once the churn has settled: a tick with sessions retired or sockets opened or closed, then a
//! quiet one. A node under steady churn is left alone, so a busy node pays nothing.

use std::sync::Arc;
use std::time::Duration;

use crate::node::OpenSockets;
use crate::session::SessionRegistry;

/// How often the trimmer looks for churn.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Runs until the arbiter it was spawned on stops.
pub async fn trim_after_churn(registry: Arc<SessionRegistry>, sockets: OpenSockets) {
    let churn = || (registry.retired_total(), sockets.changes());
    let mut seen = churn();
    let mut unsettled = false;
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tick.tick().await;
        let now = churn();
        if now != seen {
            seen = now;
            unsettled = true;
        } else if unsettled {
            unsettled = false;
            release_free_memory();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas and returns unused pages to the kernel;
    // it has no preconditions and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
