//! The node's open councils: which [`CouncilActor`] serves which council, started on the
//! councils' arbiter, and resumed from the store when the node starts.

use std::sync::Arc;

use actix::{Actor, Addr, ArbiterHandle};
use dashmap::DashMap;

use super::actor::{CouncilActor, CouncilDeps};
use super::model::Council;
use crate::protocol::{CouncilId, SessionId};
use crate::session::SessionRegistry;
use crate::store::{SharedStore, StoreError};
use crate::tasks::Scheduler;

pub struct Councils {
    /// Each open council's actor, with its session for scope checks without a store read.
    live: DashMap<CouncilId, (SessionId, Addr<CouncilActor>)>,
    arbiter: ArbiterHandle,
    store: SharedStore,
    scheduler: Addr<Scheduler>,
    sessions: Arc<SessionRegistry>,
}

impl Councils {
    pub fn new(
        arbiter: ArbiterHandle,
        store: SharedStore,
        scheduler: Addr<Scheduler>,
        sessions: Arc<SessionRegistry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            live: DashMap::new(),
            arbiter,
            store,
            scheduler,
            sessions,
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
}
