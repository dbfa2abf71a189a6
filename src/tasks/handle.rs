//! `SchedulerHandle`: the node's one way to reach its [`Scheduler`], and the scheduler's
//! supervisor.
//!
//! Everyone who talks to the scheduler (worker connections, councils, the task routes) asks the
//! handle for the current address at each send, so a scheduler rebuilt after a crash is found
//! without anyone re-registering. The lock guards only the address, never the actor's state.
//! A crashed scheduler hands its workers to [`SchedulerHandle::restart_crashed`], which starts a
//! successor on the same arbiter after a backoff and sends it [`Adopt`]; in a crash loop the
//! handle gives up, closes the workers' sockets (they reconnect to another node), and
//! [`SchedulerHandle::is_running`] turns false for `/readyz`.

use std::sync::{Arc, PoisonError, RwLock, Weak};

use actix::{Actor, Addr, ArbiterHandle};

use super::scheduler::{Adopt, Scheduler, SchedulerConfig};
use crate::protocol::{ErrorCode, Refusal};
use crate::session::SessionRegistry;
use crate::store::SharedStore;
use crate::supervisor::{CrashLoop, Verdict};

pub struct SchedulerHandle {
    current: RwLock<Addr<Scheduler>>,
    arbiter: ArbiterHandle,
    store: SharedStore,
    registry: Arc<SessionRegistry>,
    config: SchedulerConfig,
    crashes: CrashLoop<()>,
}

impl SchedulerHandle {
    /// Starts the node's scheduler on `arbiter`.
    pub fn start(
        arbiter: ArbiterHandle,
        store: SharedStore,
        registry: Arc<SessionRegistry>,
        config: SchedulerConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|handle: &Weak<Self>| {
            let first = spawn(&arbiter, &store, &registry, &config, handle.clone());
            Self {
                current: RwLock::new(first),
                arbiter,
                store,
                registry,
                config,
                crashes: CrashLoop::new("scheduler"),
            }
        })
    }

    /// The scheduler's current address.
    pub fn addr(&self) -> Addr<Scheduler> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// False once the supervisor has given the scheduler up.
    pub fn is_running(&self) -> bool {
        self.addr().connected()
    }

    /// Crashes from now on are the node stopping.
    pub fn begin_shutdown(&self) {
        self.crashes.begin_shutdown();
    }

    /// The supervisor's half of a crash: rebuild the scheduler after a backoff and hand it the
    /// survivors, or give up on a crash loop.
    pub(super) fn restart_crashed(self: Arc<Self>, survivors: Adopt) {
        let after = match self.crashes.crashed(&()) {
            Verdict::ShuttingDown => return,
            Verdict::Restart { after } => after,
            Verdict::GiveUp => {
                let refusal = Refusal::new(
                    ErrorCode::Internal,
                    "this node's scheduler failed repeatedly and was stopped; reconnect to \
                     another node",
                );
                return survivors.abandon(&refusal);
            }
        };
        actix::spawn(async move {
            tokio::time::sleep(after).await;
            let next = spawn(
                &self.arbiter,
                &self.store,
                &self.registry,
                &self.config,
                Arc::downgrade(&self),
            );
            next.do_send(survivors);
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        });
    }
}

fn spawn(
    arbiter: &ArbiterHandle,
    store: &SharedStore,
    registry: &Arc<SessionRegistry>,
    config: &SchedulerConfig,
    handle: Weak<SchedulerHandle>,
) -> Addr<Scheduler> {
    let (store, registry, config) = (store.clone(), registry.clone(), config.clone());
    Scheduler::start_in_arbiter(arbiter, move |_| {
        Scheduler::new(store, registry, config, handle)
    })
}
