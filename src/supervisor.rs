//! The restart policy of our own supervisors.
//!
//! actix's `Supervisor` restarts an actor that stops, but not one that panics: a panic unwinds
//! through the actor's task and drops it. So each supervised actor (`SessionActor`,
//! `CouncilActor`, `Scheduler`) reports its own crash from `Drop`, which runs on every way out, a
//! panic included, and hands whatever must survive (its connections, its workers) to its
//! supervisor. The supervisor asks [`CrashLoop::crashed`] whether to rebuild the child from its
//! checkpoint, and after how long; a child that keeps crashing is given up. Restarts, panics and
//! give-ups are counted in `/metrics`, labelled by the kind of actor.

use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::telemetry;

/// Crash restarts of one child tolerated within [`RESTART_WINDOW`] before giving up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// The first restart's delay; it doubles with each recent restart, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a supervisor does about a child that crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Rebuild it from its checkpoint after this delay.
    Restart { after: Duration },
    /// It crashed more than [`MAX_RESTARTS`] times within [`RESTART_WINDOW`]: leave it down.
    GiveUp,
    /// The node is shutting down: crashes now are the arbiters stopping, not failures.
    ShuttingDown,
}

/// Recent crashes per child, for one kind of actor.
pub struct CrashLoop<K: Eq + Hash> {
    kind: &'static str,
    recent: DashMap<K, VecDeque<Instant>>,
    shutting_down: AtomicBool,
}

impl<K: Eq + Hash + Clone> CrashLoop<K> {
    /// A policy for actors of `kind` (the `kind` label of the supervision metrics).
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            recent: DashMap::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Records that `child` crashed, and says what to do. Counts the panic when the crash is
    /// one (it is called from `Drop`, where `std::thread::panicking` tells), and the restart or
    /// the give-up.
    pub fn crashed(&self, child: &K) -> Verdict {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Verdict::ShuttingDown;
        }
        if std::thread::panicking() {
            telemetry::actor_panic(self.kind);
        }
        let recent = {
            let mut history = self.recent.entry(child.clone()).or_default();
            let now = Instant::now();
            while history
                .front()
                .is_some_and(|at| now.duration_since(*at) > RESTART_WINDOW)
            {
                history.pop_front();
            }
            history.push_back(now);
            history.len()
        };
        if recent > MAX_RESTARTS {
            tracing::error!(
                kind = self.kind,
                recent,
                "actor keeps crashing; giving up on it"
            );
            telemetry::supervisor_gave_up(self.kind);
            return Verdict::GiveUp;
        }
        telemetry::actor_restart(self.kind);
        let after = FIRST_BACKOFF
            .saturating_mul(1 << (recent - 1).min(10))
            .min(MAX_BACKOFF);
        tracing::warn!(
            kind = self.kind,
            ?after,
            recent,
            "restarting a crashed actor from its checkpoint"
        );
        Verdict::Restart { after }
    }

    /// From now on every crash is the node stopping.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_gives_up() {
        let crashes = CrashLoop::new("test");
        let mut delays = Vec::new();
        for _ in 0..MAX_RESTARTS {
            match crashes.crashed(&"a") {
                Verdict::Restart { after } => delays.push(after),
                other => panic!("expected a restart, got {other:?}"),
            }
        }
        assert!(delays.windows(2).all(|w| w[0] < w[1]), "{delays:?}");
        assert_eq!(crashes.crashed(&"a"), Verdict::GiveUp);
        // Another child has its own history.
        assert!(matches!(crashes.crashed(&"b"), Verdict::Restart { .. }));
        crashes.begin_shutdown();
        assert_eq!(crashes.crashed(&"b"), Verdict::ShuttingDown);
    }
}
