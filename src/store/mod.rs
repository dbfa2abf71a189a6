//! Durable state behind one [`Store`] trait, with a SQLite and a PostgreSQL implementation.
//!
//! The store is the source of truth: an ack is sent only after the store has committed. Both
//! backends share their SQL (see [`sql`]); each has its own migration folder, because their
//! DDL will diverge as features land (queue claims, ownership leases).

mod group;
mod sql;

#[cfg(feature = "fault-injection")]
pub mod fault;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::protocol::{CouncilId, DocName, SessionId, TaskId, WorkerId};
use crate::session::log::Event;
use crate::tasks::{Claim, ClaimedTask, ExpiredLease, Settled, TaskRecord, TaskWrites};

pub use group::GroupCommit;
pub use sql::{PgStore, SqliteStore};

/// Errors of the storage layer. Callers map any of them to `storage_unavailable`, except where
/// a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The session's lease has a newer epoch: another node (or a newer actor) owns it now, and
    /// this write was refused.
    #[error("this node no longer owns the session: its lease was taken over")]
    Deposed,
    /// The group commit this batch was part of failed as a whole (the store was unreachable,
    /// say), and every batch in it shares the one error.
    #[error("{0}")]
    Group(Arc<StoreError>),
    /// The store answered a group commit with fewer results than batches (or panicked), so it
    /// vouches for none of the missing ones: they are refused, never acked.
    #[error("the store gave no result for this batch")]
    Unanswered,
    /// The node's committer has stopped: the node is shutting down.
    #[error("the store's committer has stopped")]
    CommitterStopped,
    #[cfg(feature = "fault-injection")]
    #[error("injected fault")]
    Injected,
}

/// One session's share of a group commit: its next events and document updates, written only
/// while `fence` still holds its lease.
#[derive(Debug, Clone)]
pub struct SessionBatch {
    pub session: SessionId,
    pub fence: Fence,
    pub events: Vec<Event>,
    pub updates: Vec<DocUpdate>,
}

impl SessionBatch {
    /// The rows this batch writes.
    pub fn rows(&self) -> usize {
        self.events.len() + self.updates.len()
    }

    /// Roughly the bytes this batch writes: its payloads.
    pub fn bytes(&self) -> usize {
        let events: usize = self.events.iter().map(|e| e.data.get().len()).sum();
        let updates: usize = self.updates.iter().map(|u| u.data.len()).sum();
        events + updates
    }
}

/// A session's durable record, with the offset of its last committed event.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: SessionId,
    pub title: String,
    /// Names one unbroken history of the log; see PROTOCOL.md.
    pub epoch: String,
    pub created_at: DateTime<Utc>,
    pub archived: bool,
    /// The offset of the last committed event; 0 for an empty log.
    pub offset: u64,
}

/// The fencing token of a session's writes: the owner node and the epoch of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub node: String,
    pub epoch: i64,
}

/// What asking for a session's lease gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This node owns the session now, under a new epoch.
    Acquired(Fence),
    /// Another node holds a live lease.
    HeldBy { node: String, until: DateTime<Utc> },
}

/// The storage operations Conclave needs. Every method is one short transaction or query.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Applies the backend's migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the store at shutdown: waits until every connection in use has come back, then
    /// closes them all, and every later call fails. A query still running when the runtimes
    /// drop would be dropped mid-flight, with no runtime left to hand its connection back to.
    async fn close(&self);

    /// Creates a session. `None` if one with this id exists already.
    async fn create_session(
        &self,
        id: &SessionId,
        title: &str,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Loads a session, creating it first if it does not exist.
    async fn open_session(&self, id: &SessionId) -> Result<SessionRecord, StoreError>;

    /// Loads a session without creating it.
    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError>;

    /// Lists unarchived sessions ordered by id, starting after `after`.
    async fn list_sessions(
        &self,
        after: Option<&SessionId>,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// Marks a session archived. `false` if there was no such live session.
    async fn archive_session(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Whether several nodes may share this store, so that sessions need leases. SQLite serves
    /// one node: there every lease call succeeds without I/O and writes are not fenced.
    fn shared(&self) -> bool;

    /// Takes a session's lease for `node` until `ttl` from now, bumping its epoch, unless
    /// another node holds a live one. A node may always take back its own lease (it restarted,
    /// or its actor did).
    async fn acquire_session(
        &self,
        id: &SessionId,
        node: &str,
        ttl: Duration,
    ) -> Result<Ownership, StoreError>;

    /// Extends every lease `node` holds to `ttl` from now, in one statement, and returns them
    /// with their epochs: a live session missing from the answer was taken over.
    async fn renew_sessions(
        &self,
        node: &str,
        ttl: Duration,
    ) -> Result<Vec<(SessionId, i64)>, StoreError>;

    /// Gives a lease up at once (the session passivated), so another node need not wait for
    /// it to expire. Its epoch stays, so the next owner's is newer.
    async fn release_session(&self, id: &SessionId, fence: &Fence) -> Result<(), StoreError>;

    /// Commits a batch of events and document updates in one transaction: all of it or none,
    /// and only while `fence` still holds the session's lease ([`StoreError::Deposed`] if not).
    async fn commit_batch(
        &self,
        id: &SessionId,
        fence: &Fence,
        events: &[Event],
        updates: &[DocUpdate],
    ) -> Result<(), StoreError>;

    /// Commits several sessions' batches, in one transaction where it can, so that many sessions
    /// share one flush to disk. Each batch is still all or nothing, fenced by its own lease, and
    /// gets its own result, in order: a deposed session or a batch that fails on its own never
    /// fails the others. This default commits them one by one.
    async fn commit_group(&self, batches: &[SessionBatch]) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let result = self
                .commit_batch(&batch.session, &batch.fence, &batch.events, &batch.updates)
                .await;
            results.push(result);
        }
        results
    }

    /// How many group commits are worth running at once: SQLite has one writer, so one.
    fn commit_lanes(&self) -> usize {
        1
    }

    /// Every document of a session: its snapshot and the updates after it.
    async fn load_docs(&self, id: &SessionId) -> Result<Vec<StoredDoc>, StoreError>;

    /// Replaces a document's snapshot with one covering updates up to `upto_seq`, and drops
    /// those updates, in one transaction, fenced like [`Store::commit_batch`].
    async fn compact_doc(
        &self,
        id: &SessionId,
        fence: &Fence,
        doc: &DocName,
        snapshot: &DocSnapshot,
    ) -> Result<(), StoreError>;

    /// Up to `limit` events with offsets above `after`, in order.
    async fn events_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// Makes one scheduler batch in one transaction: inserts, fenced transitions and lease
    /// renewals. Returns one entry per settlement, in order: `None` where the fence refused it
    /// (a stale lease, or a task already done).
    async fn write_tasks(&self, writes: &TaskWrites) -> Result<Vec<Option<Settled>>, StoreError>;

    /// Claims up to one queued task per slot of `slots` (by priority, then round-robin across
    /// sessions, then age), marks each working under a fresh lease for its slot's worker, and
    /// returns them with their slot's index. On PostgreSQL the claim skips rows other nodes have
    /// locked, so several nodes share one queue.
    async fn claim_tasks(
        &self,
        claim: &Claim,
        slots: &[WorkerId],
    ) -> Result<Vec<(usize, ClaimedTask)>, StoreError>;

    /// Working tasks whose lease expired or whose deadline passed by `now`, at most `limit`.
    async fn expired_leases(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ExpiredLease>, StoreError>;

    /// One task.
    async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Writes a council's whole state (JSON), creating its row on the first save.
    async fn save_council(&self, council: &CouncilRow) -> Result<(), StoreError>;

    /// A council's state, as last saved.
    async fn council(&self, id: &CouncilId) -> Result<Option<String>, StoreError>;

    /// The state of every council still deliberating, to resume after a restart.
    async fn open_councils(&self) -> Result<Vec<String>, StoreError>;
}

/// A council as its row stores it: the state is opaque JSON to the store.
#[derive(Debug, Clone)]
pub struct CouncilRow {
    pub id: CouncilId,
    pub session: SessionId,
    /// `deliberating`, `decided`, `no_quorum` or `canceled`.
    pub state: &'static str,
    pub data: String,
    pub created_at: DateTime<Utc>,
}

/// One yrs update of a document, as committed with its batch.
#[derive(Debug, Clone)]
pub struct DocUpdate {
    pub doc: DocName,
    /// Gap-free per document.
    pub seq: u64,
    /// The document's version after this update.
    pub version: u64,
    /// A yrs v1 update.
    pub data: Vec<u8>,
}

/// A document's compacted state: all its updates up to `upto_seq`, as one yrs v1 update.
#[derive(Debug, Clone)]
pub struct DocSnapshot {
    pub upto_seq: u64,
    pub version: u64,
    pub data: Vec<u8>,
}

/// A document as stored: its snapshot, then the updates after it in order.
#[derive(Debug, Clone)]
pub struct StoredDoc {
    pub name: DocName,
    pub snapshot: Option<DocSnapshot>,
    pub updates: Vec<DocUpdate>,
}

impl StoredDoc {
    /// The version after the last stored change.
    pub fn version(&self) -> u64 {
        self.updates
            .last()
            .map(|u| u.version)
            .or(self.snapshot.as_ref().map(|s| s.version))
            .unwrap_or(0)
    }

    /// The seq of the last stored update.
    pub fn last_seq(&self) -> u64 {
        self.updates
            .last()
            .map(|u| u.seq)
            .or(self.snapshot.as_ref().map(|s| s.upto_seq))
            .unwrap_or(0)
    }
}

/// A shared handle to the node's store.
pub type SharedStore = Arc<dyn Store>;

/// Where the store lives, as chosen by configuration.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// `postgres://…`
    Postgres(String),
    /// A SQLite file, created if missing.
    Sqlite(std::path::PathBuf),
}

/// Connects to the configured store. Migrations are applied by the caller.
pub async fn connect(location: &StoreLocation) -> Result<SharedStore, StoreError> {
    Ok(match location {
        StoreLocation::Postgres(url) => Arc::new(PgStore::connect(url).await?),
        StoreLocation::Sqlite(path) => Arc::new(SqliteStore::connect(path).await?),
    })
}
