//! Store fault injection for tests (the `fault-injection` feature, never in release builds).
//!
//! [`FaultyStore`] wraps a real store and fails its commits on demand, so tests can prove that a
//! failed commit acks nothing and leaves no gap, and fails session loads, so they can prove a
//! failed load never serves (or writes) an empty session. Other reads pass through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    DocSnapshot, DocUpdate, Fence, Ownership, SessionBatch, SessionRecord, SharedStore, Store,
    StoreError, StoredDoc,
};
use crate::protocol::{DocName, SessionId, TaskId, WorkerId};
use crate::session::log::Event;
use crate::tasks::{Claim, ClaimedTask, ExpiredLease, Settled, TaskRecord, TaskWrites};

/// The switch a test holds to fail the wrapped store's writes.
#[derive(Default)]
pub struct FaultSwitch {
    fail_next_commits: AtomicU32,
    fail_all_writes: AtomicBool,
    fail_loads: AtomicBool,
}

impl FaultSwitch {
    /// Fails the next `n` event commits.
    pub fn fail_next_commits(&self, n: u32) {
        self.fail_next_commits.store(n, Ordering::SeqCst);
    }

    /// Fails every write, and pings, until switched off: a store outage.
    pub fn set_outage(&self, down: bool) {
        self.fail_all_writes.store(down, Ordering::SeqCst);
    }

    /// Fails every session load (opening it and reading its documents) until switched off.
    pub fn set_fail_loads(&self, fail: bool) {
        self.fail_loads.store(fail, Ordering::SeqCst);
    }

    fn check_load(&self) -> Result<(), StoreError> {
        if self.fail_loads.load(Ordering::SeqCst) {
            Err(StoreError::Injected)
        } else {
            Ok(())
        }
    }

    /// Task writes fail only in an outage: the counted failures are meant for event commits.
    fn check_outage(&self) -> Result<(), StoreError> {
        if self.fail_all_writes.load(Ordering::SeqCst) {
            Err(StoreError::Injected)
        } else {
            Ok(())
        }
    }

    fn check_write(&self) -> Result<(), StoreError> {
        if self.fail_all_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        let took = self
            .fail_next_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match took {
            Ok(_) => Err(StoreError::Injected),
            Err(_) => Ok(()),
        }
    }
}

/// A real store whose writes fail when its [`FaultSwitch`] says so.
pub struct FaultyStore {
    inner: SharedStore,
    switch: Arc<FaultSwitch>,
}

impl FaultyStore {
    pub fn wrap(inner: SharedStore) -> (Arc<Self>, Arc<FaultSwitch>) {
        let switch = Arc::new(FaultSwitch::default());
        (
            Arc::new(Self {
                inner,
                switch: switch.clone(),
            }),
            switch,
        )
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.switch.fail_all_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        self.inner.ping().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    async fn create_session(
        &self,
        id: &SessionId,
        title: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.create_session(id, title).await
    }

    async fn open_session(&self, id: &SessionId) -> Result<SessionRecord, StoreError> {
        self.switch.check_load()?;
        self.inner.open_session(id).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(id).await
    }

    async fn list_sessions(
        &self,
        after: Option<&SessionId>,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        self.inner.list_sessions(after, limit).await
    }

    async fn archive_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.archive_session(id).await
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn acquire_session(
        &self,
        id: &SessionId,
        node: &str,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        self.switch.check_load()?;
        self.inner.acquire_session(id, node, ttl).await
    }

    async fn renew_sessions(
        &self,
        node: &str,
        ttl: Duration,
    ) -> Result<Vec<(SessionId, i64)>, StoreError> {
        self.inner.renew_sessions(node, ttl).await
    }

    async fn release_session(&self, id: &SessionId, fence: &Fence) -> Result<(), StoreError> {
        self.inner.release_session(id, fence).await
    }

    async fn commit_batch(
        &self,
        id: &SessionId,
        fence: &Fence,
        events: &[Event],
        updates: &[DocUpdate],
    ) -> Result<(), StoreError> {
        self.switch.check_write()?;
        self.inner.commit_batch(id, fence, events, updates).await
    }

    /// Fails the batches the switch says to, one by one as [`Self::commit_batch`] would, and
    /// commits the rest as the wrapped store groups them.
    async fn commit_group(&self, batches: &[SessionBatch]) -> Vec<Result<(), StoreError>> {
        let checks: Vec<Result<(), StoreError>> =
            batches.iter().map(|_| self.switch.check_write()).collect();
        let passing: Vec<SessionBatch> = batches
            .iter()
            .zip(&checks)
            .filter(|(_, check)| check.is_ok())
            .map(|(batch, _)| batch.clone())
            .collect();
        let mut committed = self.inner.commit_group(&passing).await.into_iter();
        checks
            .into_iter()
            .map(|check| {
                check?;
                committed.next().unwrap_or(Err(StoreError::Unanswered))
            })
            .collect()
    }

    fn commit_lanes(&self) -> usize {
        self.inner.commit_lanes()
    }

    async fn load_docs(&self, id: &SessionId) -> Result<Vec<StoredDoc>, StoreError> {
        self.switch.check_load()?;
        self.inner.load_docs(id).await
    }

    async fn compact_doc(
        &self,
        id: &SessionId,
        fence: &Fence,
        doc: &DocName,
        snapshot: &DocSnapshot,
    ) -> Result<(), StoreError> {
        self.switch.check_write()?;
        self.inner.compact_doc(id, fence, doc, snapshot).await
    }

    async fn events_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner.events_after(id, after, limit).await
    }

    async fn write_tasks(&self, writes: &TaskWrites) -> Result<Vec<Option<Settled>>, StoreError> {
        self.switch.check_outage()?;
        self.inner.write_tasks(writes).await
    }

    async fn claim_tasks(
        &self,
        claim: &Claim,
        slots: &[WorkerId],
    ) -> Result<Vec<(usize, ClaimedTask)>, StoreError> {
        self.switch.check_outage()?;
        self.inner.claim_tasks(claim, slots).await
    }

    async fn expired_leases(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<Vec<ExpiredLease>, StoreError> {
        self.inner.expired_leases(now, limit).await
    }

    async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.task(id).await
    }

    async fn save_council(&self, council: &super::CouncilRow) -> Result<(), StoreError> {
        self.switch.check_outage()?;
        self.inner.save_council(council).await
    }

    async fn council(&self, id: &crate::protocol::CouncilId) -> Result<Option<String>, StoreError> {
        self.inner.council(id).await
    }

    async fn open_councils(&self) -> Result<Vec<String>, StoreError> {
        self.inner.open_councils().await
    }
}
