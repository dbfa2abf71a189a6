//! The node's registry of live sessions: which [`SessionActor`] serves which session id, and on
//! which arbiter it runs.
//!
//! Sessions are spread over one arbiter per core by a hash of their id, so that one busy session
//! never stalls the others. The registry holds only addresses; an actor's state stays private to
//! it. An actor removes itself when it passivates, guarded by a generation number so that a
//! stale actor never removes its successor.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, ArbiterHandle};
use dashmap::DashMap;

use super::actor::SessionActor;
use super::messages::{Deliver, LeasesRenewed, Reattach};
use crate::cluster::SharedBus;
use crate::config::Limits;
use crate::protocol::frames::ServerFrame;
use crate::protocol::{ErrorCode, Refusal, SessionId};
use crate::store::{GroupCommit, SharedStore};
use crate::supervisor::{CrashLoop, Verdict};
use crate::telemetry;

/// What every session actor of a node shares.
pub struct SessionDeps {
    pub store: SharedStore,
    /// Where sessions send their batches, to be committed together with other sessions'.
    pub commits: GroupCommit,
    pub limits: Limits,
    /// This node's id: the owner named in the leases it takes.
    pub node: String,
    /// How commands reach a session's owner on another node.
    pub bus: SharedBus,
}

struct LiveSession {
    generation: u64,
    addr: Addr<SessionActor>,
}

/// The live sessions of this node.
pub struct SessionRegistry {
    live: DashMap<SessionId, LiveSession>,
    arbiters: Vec<ArbiterHandle>,
    hasher: std::collections::hash_map::RandomState,
    next_generation: AtomicU64,
    /// Recent crashes per session, to back off and give up on a crash loop.
    crashes: CrashLoop<SessionId>,
    deps: Arc<SessionDeps>,
}

impl SessionRegistry {
    /// A registry that starts session actors on `arbiters` (at least one).
    pub fn new(deps: SessionDeps, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        Arc::new(Self {
            live: DashMap::new(),
            arbiters,
            hasher: Default::default(),
            next_generation: AtomicU64::new(1),
            crashes: CrashLoop::new("session"),
            deps: Arc::new(deps),
        })
    }

    pub fn deps(&self) -> &SessionDeps {
        &self.deps
    }

    /// The live actor of a session, starting (and loading) one if there is none. The session is
    /// created in the store if it does not exist. Refused when the node already holds
    /// `max_live_sessions`.
    pub fn activate(self: &Arc<Self>, id: &SessionId) -> Result<Addr<SessionActor>, Refusal> {
        if let Some(live) = self.live.get(id) {
            return Ok(live.addr.clone());
        }
        let max = self.deps.limits.max_live_sessions;
        if self.live.len() >= max {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("this node serves its maximum of {max} live sessions; retry later"),
            ));
        }
        Ok(self
            .live
            .entry(id.clone())
            .or_insert_with(|| {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                let arbiter = self.arbiter_for(id);
                let registry = Arc::clone(self);
                let session = id.clone();
                let addr = SessionActor::start_in_arbiter(arbiter, move |_| {
                    SessionActor::new(session, generation, registry)
                });
                telemetry::session_activated();
                LiveSession { generation, addr }
            })
            .addr
            .clone())
    }

    /// The live actor of a session, if it has one.
    pub fn live(&self, id: &SessionId) -> Option<Addr<SessionActor>> {
        self.live.get(id).map(|live| live.addr.clone())
    }

    /// Every live session's actor, for draining at shutdown.
    pub fn all_live(&self) -> Vec<Addr<SessionActor>> {
        self.live.iter().map(|entry| entry.addr.clone()).collect()
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Removes a session's entry if it still belongs to the actor of `generation`.
    pub(super) fn retire(&self, id: &SessionId, generation: u64) {
        if self
            .live
            .remove_if(id, |_, live| live.generation == generation)
            .is_some()
        {
            telemetry::session_retired();
        }
    }

    /// Stops restarting crashed sessions: the node is shutting down.
    pub fn begin_shutdown(&self) {
        self.crashes.begin_shutdown();
    }

    /// The owner's heartbeat: every third of the lease TTL, renews all of this node's session
    /// leases in one statement, and tells each live session which epochs the store still gives
    /// this node, so one that was taken over stops serving. Ends when the registry is dropped
    /// or the node shuts down.
    pub async fn keep_leases(registry: Weak<Self>) {
        let Some(every) = registry
            .upgrade()
            .map(|r| r.deps.limits.owner_lease_ttl() / 3)
        else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(registry) = registry.upgrade() else {
                return;
            };
            if registry.crashes.is_shutting_down() || !registry.deps.store.shared() {
                return;
            }
            let deps = &registry.deps;
            let as_of = Instant::now();
            match deps
                .store
                .renew_sessions(&deps.node, deps.limits.owner_lease_ttl())
                .await
            {
                Ok(held) => {
                    let held = Arc::new(held.into_iter().collect::<HashMap<_, _>>());
                    for live in registry.live.iter() {
                        live.addr.do_send(LeasesRenewed {
                            held: Arc::clone(&held),
                            as_of,
                        });
                    }
                }
                // The leases may lapse meanwhile; fenced writes keep a successor safe.
                Err(err) => tracing::warn!(%err, "session leases not renewed"),
            }
        }
    }

    /// Expires every lease this node holds, so other nodes need not wait out the TTL.
    pub async fn release_all(&self) {
        if let Err(err) = self
            .deps
            .store
            .renew_sessions(&self.deps.node, Duration::ZERO)
            .await
        {
            tracing::warn!(%err, "session leases not released; they expire by themselves");
        }
    }

    /// The supervisor's half of a crash: a session actor of `generation` died without retiring
    /// (a panic). It is rebuilt from its checkpoint (the store) after a backoff, and its
    /// connections are re-attached to the new actor. A session in a crash loop
    /// ([`CrashLoop`]) is given up: its connections are told, and it stays down until someone
    /// uses it again.
    pub(super) fn restart_crashed(
        self: &Arc<Self>,
        id: SessionId,
        generation: u64,
        survivors: Reattach,
    ) {
        self.retire(&id, generation);
        let backoff = match self.crashes.crashed(&id) {
            Verdict::ShuttingDown => return,
            Verdict::Restart { after } => after,
            Verdict::GiveUp => {
                let refusal = Refusal::new(
                    ErrorCode::Internal,
                    format!("session {id} failed repeatedly and was stopped; rejoin later"),
                );
                let error = ServerFrame::error(None, &refusal).encode();
                for (_, _, outbox) in survivors.conns {
                    outbox.do_send(Deliver {
                        ends_membership: Some(id.clone()),
                        ..Deliver::ordered(error.clone())
                    });
                }
                return;
            }
        };
        let registry = Arc::clone(self);
        actix::spawn(async move {
            tokio::time::sleep(backoff).await;
            match registry.activate(&id) {
                Ok(addr) => addr.do_send(survivors),
                Err(refusal) => tracing::error!(session = %id, %refusal, "restart refused"),
            }
        });
    }

    fn arbiter_for(&self, id: &SessionId) -> &ArbiterHandle {
        let index = (self.hasher.hash_one(id) % self.arbiters.len() as u64) as usize;
        &self.arbiters[index]
    }
}
