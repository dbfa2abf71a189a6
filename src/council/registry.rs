//! The node's open councils: which [`CouncilActor`] serves which council, started on the
//! councils' arbiter, resumed from the store when the node starts, and restarted from its last
//! saved state when it crashes (the registry is the councils' supervisor).

use std::sync::Arc;

use actix::{Actor, Addr, ArbiterHandle};
use dashmap::DashMap;
use tokio::task::JoinHandle;

use super::actor::{CouncilActor, CouncilDeps};
use super::model::{Council, CouncilState};
use crate::protocol::{CouncilId, SessionId};
use crate::session::SessionRegistry;
use crate::store::{SharedStore, StoreError};
use crate::supervisor::{CrashLoop, Verdict};
use crate::tasks::SchedulerHandle;

pub struct Councils {
    /// Each open council's actor, with its session for scope checks without a store read.
    live: DashMap<CouncilId, (SessionId, Addr<CouncilActor>)>,
    arbiter: ArbiterHandle,
    store: SharedStore,
    scheduler: Arc<SchedulerHandle>,
    sessions: Arc<SessionRegistry>,
    crashes: CrashLoop<CouncilId>,
}

impl Councils {
    pub fn new(
        arbiter: ArbiterHandle,
        store: SharedStore,
        scheduler: Arc<SchedulerHandle>,
        sessions: Arc<SessionRegistry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            live: DashMap::new(),
            arbiter,
            store,
            scheduler,
            sessions,
            crashes: CrashLoop::new("council"),
        })
    }

    /// Starts the actor of a council whose state is already saved.
    pub fn start(self: &Arc<Self>, council: Council) {
        let (id, session) = (council.id.clone(), council.session.clone());
        let deps = CouncilDeps {
            store: self.store.clone(),
            scheduler: self.scheduler.clone(),
            sessions: self.sessions.clone(),
            councils: Arc::clone(self),
        };
        let addr = CouncilActor::start_in_arbiter(&self.arbiter, move |_| {
            CouncilActor::new(council, deps)
        });
        self.live.insert(id, (session, addr));
    }

    /// Resumes every council the store says is still deliberating.
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        let open = self.store.open_councils().await?;
        let mut resumed = 0;
        for data in open {
            match serde_json::from_str::<Council>(&data) {
                Ok(council) => {
                    self.start(council);
                    resumed += 1;
                }
                Err(err) => tracing::error!(%err, "a stored council is corrupt; not resumed"),
            }
        }
        Ok(resumed)
    }

    /// The actor of an open council, and the session it deliberates in.
    pub fn live(&self, id: &CouncilId) -> Option<(SessionId, Addr<CouncilActor>)> {
        self.live.get(id).map(|entry| entry.clone())
    }

    pub fn retire(&self, id: &CouncilId) {
        self.live.remove(id);
    }

    /// Crashes from now on are the node stopping.
    pub fn begin_shutdown(&self) {
        self.crashes.begin_shutdown();
    }

    /// The supervisor's half of a crash: once the dead actor's writer has saved what it was
    /// given (`saver`), the council is rebuilt from its saved state after a backoff. Given up
    /// in a crash loop, the council stays open in the store and resumes at the node's next
    /// start.
    pub(super) fn restart_crashed(self: &Arc<Self>, id: CouncilId, saver: JoinHandle<()>) {
        let after = match self.crashes.crashed(&id) {
            Verdict::ShuttingDown => return,
            Verdict::GiveUp => {
                tracing::error!(council = %id, "council left down until the node restarts");
                return;
            }
            Verdict::Restart { after } => after,
        };
        let councils = Arc::clone(self);
        actix::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = saver.await;
            match councils.store.council(&id).await {
                Ok(Some(data)) => match serde_json::from_str::<Council>(&data) {
                    Ok(council) if council.state == CouncilState::Deliberating => {
                        councils.start(council)
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(council = %id, %err, "a stored council is corrupt; not restarted")
                    }
                },
                Ok(None) => tracing::error!(council = %id, "a crashed council was never saved"),
                Err(err) => {
                    tracing::error!(council = %id, %err, "council not restarted: the store is unavailable; it resumes at the node's next start")
                }
            }
        });
    }
}
