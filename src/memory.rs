//! Giving freed memory back to the operating system after sessions passivate.
//!
//! glibc's allocator keeps freed pages in its arenas, so without a nudge a node's resident
//! memory stays at its high-water mark after thousands of sessions passivate. The trimmer asks
//! it to release them, but only after sessions actually went away, so a busy node pays nothing.

use std::sync::Arc;
use std::time::Duration;

use crate::session::SessionRegistry;

/// How often the trimmer looks for passivated sessions.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Runs until the arbiter it was spawned on stops.
pub async fn trim_after_passivation(registry: Arc<SessionRegistry>) {
    let mut seen = registry.retired_total();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tick.tick().await;
        let retired = registry.retired_total();
        if retired != seen {
            seen = retired;
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
