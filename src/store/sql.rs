//! The SQL both backends share, instantiated once for SQLite and once for PostgreSQL.
//!
//! The statements use `$N` placeholders, which both sqlx drivers bind by number, so one body of
//! code serves both. A macro stamps it out per backend instead of a generic over
//! `sqlx::Database`, whose executor bounds would bury the SQL. Queries are runtime queries, so
//! a clean clone builds with no database up.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::{
    CouncilRow, DocSnapshot, DocUpdate, Fence, Ownership, SessionBatch, SessionRecord, Store,
    StoreError, StoredDoc,
};
use crate::protocol::{CouncilId, DocName, LeaseId, SessionId, TaskId, TaskKind, WorkerId};
use crate::session::log::{Actor, Event, EventKind};
use crate::tasks::{
    Claim, ClaimedTask, Expect, ExpiredLease, Outcome, Settled, TaskRecord, TaskState, TaskWrites,
};

/// The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so that a commit is
/// on disk before it is acked.
pub struct SqliteStore {
    /// Reads, several at once (WAL lets them run beside a write).
    pool: SqlitePool,
    /// Writes, over one connection. SQLite has one writer anyway; with several connections the
    /// losers of the write lock wait in SQLite's busy handler, which sleeps 1, 2, 5, 10… ms
    /// between tries, where this pool's queue hands the connection on as soon as it is free.
    writer: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|err| {
                StoreError::Corrupt(format!("cannot create data dir {}: {err}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self { pool, writer })
    }
}

/// The shared store of a cluster, and the store of any node given `DATABASE_URL`.
pub struct PgStore {
    pool: PgPool,
    /// The same pool: PostgreSQL runs many writers at once.
    writer: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // A short acquire timeout: while the database is unreachable, a write should be refused
        // within a couple of seconds, not hang the session's batch.
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await?;
        Ok(Self {
            writer: pool.clone(),
            pool,
        })
    }
}

fn millis_to_time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

fn to_offset(raw: i64) -> Result<u64, StoreError> {
    u64::try_from(raw).map_err(|_| StoreError::Corrupt(format!("negative offset {raw}")))
}

fn doc_name(raw: &str) -> Result<DocName, StoreError> {
    DocName::parse(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// Parses an id column with the name grammar, as a corrupt row rather than a panic.
fn stored_id<T>(
    raw: &str,
    parse: impl Fn(&str) -> Result<T, crate::protocol::InvalidName>,
) -> Result<T, StoreError> {
    parse(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn stored_json(raw: String, column: &str) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(raw).map_err(|e| StoreError::Corrupt(format!("task {column}: {e}")))
}

fn to_count(raw: i64, column: &str) -> Result<u32, StoreError> {
    u32::try_from(raw).map_err(|_| StoreError::Corrupt(format!("task {column} {raw} out of range")))
}

/// The columns of a [`TaskRecord`], as a literal so that `concat!` can extend it.
macro_rules! select_tasks {
    () => {
        "SELECT id, session_id, kind, input, priority, max_attempts, timeout_s, state, attempt, \
         worker_id, output, error, submitted_by, created_at_ms, updated_at_ms FROM tasks"
    };
}

/// The columns of a [`SessionRecord`], as a literal so that `concat!` can extend it.
macro_rules! select_sessions {
    () => {
        "SELECT s.id, s.title, s.epoch, s.created_at_ms, s.archived_at_ms, \
         COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.session_id = s.id), 0) AS last_seq \
         FROM sessions s"
    };
}

/// One session's part of a group commit, borrowed from its batch.
struct GroupPart<'a> {
    session: &'a SessionId,
    fence: &'a Fence,
    events: &'a [Event],
    updates: &'a [DocUpdate],
}

impl<'a> GroupPart<'a> {
    fn of(batch: &'a SessionBatch) -> Self {
        Self {
            session: &batch.session,
            fence: &batch.fence,
            events: &batch.events,
            updates: &batch.updates,
        }
    }
}

/// The events of a group, each with its session.
fn event_rows<'a>(parts: &[&GroupPart<'a>]) -> Vec<(&'a SessionId, &'a Event)> {
    parts
        .iter()
        .flat_map(|part| part.events.iter().map(|event| (part.session, event)))
        .collect()
}

/// How SQLite's group inserts begin. A plain multi-row INSERT in a transaction keeps a
/// statement journal, the pages it changed, so that a failing row undoes that statement alone;
/// past 64 KiB SQLite spills it to a temporary file, as many disk writes again as the WAL's.
/// `OR FAIL` keeps the rows before a failing one instead, so SQLite needs no journal, and a
/// failed insert never commits anyway: `write_group` returns the error and the transaction is
/// dropped, rolled back whole.
const SQLITE_INSERT_LOG: &str = "INSERT OR FAIL INTO";

/// Inserts a group's events on SQLite: multi-row VALUES, in chunks that stay under its bind
/// limit.
async fn insert_events_sqlite(
    tx: &mut sqlx::SqliteConnection,
    parts: &[&GroupPart<'_>],
) -> Result<(), StoreError> {
    for chunk in event_rows(parts).chunks(1000) {
        let mut insert = QueryBuilder::new(format!(
            "{SQLITE_INSERT_LOG} events (session_id, seq, kind, actor_id, actor_name, at_ms, data) "
        ));
        insert.push_values(chunk, |mut row, (session, event)| {
            row.push_bind(session.as_str())
                .push_bind(from_offset(event.offset))
                .push_bind(event.kind.as_str())
                .push_bind(event.actor.id.as_str())
                .push_bind(event.actor.name.as_str())
                .push_bind(event.at.timestamp_millis())
                .push_bind(event.data.get());
        });
        insert.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Inserts a group's events on PostgreSQL: one statement of column arrays, whatever the group
/// size, so its text (and plan) is the same every time instead of one per row count.
async fn insert_events_pg(
    tx: &mut sqlx::PgConnection,
    parts: &[&GroupPart<'_>],
) -> Result<(), StoreError> {
    let rows = event_rows(parts);
    if rows.is_empty() {
        return Ok(());
    }
    let sessions: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, e)| from_offset(e.offset)).collect();
    let kinds: Vec<&str> = rows.iter().map(|(_, e)| e.kind.as_str()).collect();
    let actor_ids: Vec<&str> = rows.iter().map(|(_, e)| e.actor.id.as_str()).collect();
    let actor_names: Vec<&str> = rows.iter().map(|(_, e)| e.actor.name.as_str()).collect();
    let ats: Vec<i64> = rows.iter().map(|(_, e)| e.at.timestamp_millis()).collect();
    let data: Vec<&str> = rows.iter().map(|(_, e)| e.data.get()).collect();
    sqlx::query(
        "INSERT INTO events (session_id, seq, kind, actor_id, actor_name, at_ms, data) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])",
    )
    .bind(&sessions)
    .bind(&seqs)
    .bind(&kinds)
    .bind(&actor_ids)
    .bind(&actor_names)
    .bind(&ats)
    .bind(&data)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// SQLite serves one node and fences nothing: every part of a group holds.
async fn held_fences_sqlite(
    _tx: &mut sqlx::SqliteConnection,
    parts: &[GroupPart<'_>],
) -> Result<Vec<bool>, StoreError> {
    Ok(vec![true; parts.len()])
}

/// Locks the lease rows of every session in a group and says which fences still hold them.
/// The rows are locked in id order, as lease renewal locks them, so two transactions never
/// wait on each other crosswise. The locks last until the commit: a takeover waits for this
/// transaction, or this one sees the newer epoch and writes nothing for that session.
async fn held_fences_pg(
    tx: &mut sqlx::PgConnection,
    parts: &[GroupPart<'_>],
) -> Result<Vec<bool>, StoreError> {
    let ids: Vec<&str> = parts.iter().map(|p| p.session.as_str()).collect();
    let rows = sqlx::query(
        "SELECT session_id, node_id, epoch FROM session_owners \
         WHERE session_id = ANY($1) ORDER BY session_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut owners: HashMap<String, (String, i64)> = HashMap::with_capacity(rows.len());
    for row in &rows {
        owners.insert(
            row.try_get("session_id")?,
            (row.try_get("node_id")?, row.try_get("epoch")?),
        );
    }
    Ok(parts
        .iter()
        .map(|part| {
            owners
                .get(part.session.as_str())
                .is_some_and(|(node, epoch)| *node == part.fence.node && *epoch == part.fence.epoch)
        })
        .collect())
}

/// The first statement of every fenced write: it touches the lease row only if the fence
/// still holds it, and returns [`StoreError::Deposed`] from the calling method (rolling the
/// transaction back) if not. On PostgreSQL the row stays locked until the commit, so a takeover
/// waits for this transaction, or this one sees the newer epoch and writes nothing.
macro_rules! check_fence {
    ($tx:expr, $id:expr, $fence:expr) => {{
        let held = sqlx::query(
            "UPDATE session_owners SET epoch = epoch \
             WHERE session_id = $1 AND node_id = $2 AND epoch = $3",
        )
        .bind($id.as_str())
        .bind($fence.node.as_str())
        .bind($fence.epoch)
        .execute(&mut *$tx)
        .await?;
        if held.rows_affected() != 1 {
            return Err(StoreError::Deposed);
        }
    }};
}

macro_rules! sql_store {
    ($store:ty, $backend:literal, $migrator:expr, $row:ty, begin_write: $begin:literal, skip_locked: $lock:literal, insert_events: $insert_events:ident, insert_log: $insert_log:expr, held_fences: $held_fences:ident, shared: $shared:literal) => {
        impl $store {
            /// Writes a group of sessions' batches in one transaction, each only if its fence
            /// holds, and says which did.
            async fn write_group(&self, parts: &[GroupPart<'_>]) -> Result<Vec<bool>, StoreError> {
                let mut tx = self.writer.begin().await?;
                let held = $held_fences(&mut tx, parts).await?;
                let writing: Vec<&GroupPart<'_>> =
                    parts.iter().zip(&held).filter(|(_, held)| **held).map(|(part, _)| part).collect();
                $insert_events(&mut tx, &writing).await?;
                let updates: Vec<(&SessionId, &DocUpdate)> = writing
                    .iter()
                    .flat_map(|part| part.updates.iter().map(|update| (part.session, update)))
                    .collect();
                for chunk in updates.chunks(1000) {
                    let mut insert =
                        QueryBuilder::new(format!("{} doc_updates (session_id, doc, seq, version, data) ", $insert_log));
                    insert.push_values(chunk, |mut row, (session, update)| {
                        row.push_bind(session.as_str())
                            .push_bind(update.doc.as_str())
                            .push_bind(from_offset(update.seq))
                            .push_bind(from_offset(update.version))
                            .push_bind(update.data.as_slice());
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(held)
            }

            fn task_from_row(row: &$row) -> Result<TaskRecord, StoreError> {
                let state: String = row.try_get("state")?;
                Ok(TaskRecord {
                    id: stored_id(&row.try_get::<String, _>("id")?, TaskId::parse)?,
                    session: stored_id(&row.try_get::<String, _>("session_id")?, SessionId::parse)?,
                    kind: stored_id(&row.try_get::<String, _>("kind")?, TaskKind::parse)?,
                    state: TaskState::parse(&state)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown task state {state}")))?,
                    attempt: to_count(row.try_get::<i64, _>("attempt")?, "attempt")?,
                    input: stored_json(row.try_get("input")?, "input")?,
                    output: row
                        .try_get::<Option<String>, _>("output")?
                        .map(|raw| stored_json(raw, "output"))
                        .transpose()?,
                    error: row.try_get("error")?,
                    priority: i32::try_from(row.try_get::<i64, _>("priority")?)
                        .map_err(|_| StoreError::Corrupt("task priority out of range".into()))?,
                    max_attempts: to_count(row.try_get::<i64, _>("max_attempts")?, "max_attempts")?,
                    timeout_s: to_count(row.try_get::<i64, _>("timeout_s")?, "timeout_s")?,
                    worker: row
                        .try_get::<Option<String>, _>("worker_id")?
                        .map(|raw| stored_id(&raw, WorkerId::parse))
                        .transpose()?,
                    submitted_by: row.try_get("submitted_by")?,
                    created_at: millis_to_time(row.try_get("created_at_ms")?)?,
                    updated_at: millis_to_time(row.try_get("updated_at_ms")?)?,
                })
            }

            fn session_from_row(row: &$row) -> Result<SessionRecord, StoreError> {
                let id: String = row.try_get("id")?;
                Ok(SessionRecord {
                    id: SessionId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    title: row.try_get("title")?,
                    epoch: row.try_get("epoch")?,
                    created_at: millis_to_time(row.try_get("created_at_ms")?)?,
                    archived: row.try_get::<Option<i64>, _>("archived_at_ms")?.is_some(),
                    offset: to_offset(row.try_get("last_seq")?)?,
                })
            }

            fn event_from_row(row: &$row) -> Result<Event, StoreError> {
                let kind: String = row.try_get("kind")?;
                let data: String = row.try_get("data")?;
                Ok(Event {
                    offset: to_offset(row.try_get("seq")?)?,
                    kind: EventKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind}")))?,
                    actor: Actor {
                        id: row.try_get("actor_id")?,
                        name: row.try_get("actor_name")?,
                    },
                    at: millis_to_time(row.try_get("at_ms")?)?,
                    data: RawValue::from_string(data)
                        .map_err(|e| StoreError::Corrupt(format!("event data: {e}")))?,
                })
            }

            /// Inserts the session unless it exists; true if this call created it.
            async fn insert_session(&self, id: &SessionId, title: &str) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "INSERT INTO sessions (id, title, epoch, created_at_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(id.as_str())
                .bind(title)
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(Utc::now().timestamp_millis())
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn shared(&self) -> bool {
                $shared
            }

            async fn migrate(&self) -> Result<(), StoreError> {
                $migrator.run(&self.writer).await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
                self.writer.close().await;
            }

            async fn create_session(
                &self,
                id: &SessionId,
                title: &str,
            ) -> Result<Option<SessionRecord>, StoreError> {
                if self.insert_session(id, title).await? {
                    self.session(id).await
                } else {
                    Ok(None)
                }
            }

            async fn open_session(&self, id: &SessionId) -> Result<SessionRecord, StoreError> {
                self.insert_session(id, id.as_str()).await?;
                self.session(id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt(format!("session {id} vanished on open")))
            }

            async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
                let row = sqlx::query(concat!(select_sessions!(), " WHERE s.id = $1")).bind(id.as_str()).fetch_optional(&self.pool).await?;
                row.as_ref().map(Self::session_from_row).transpose()
            }

            async fn list_sessions(
                &self,
                after: Option<&SessionId>,
                limit: u32,
            ) -> Result<Vec<SessionRecord>, StoreError> {
                let rows = sqlx::query(concat!(
                    select_sessions!(),
                    " WHERE s.archived_at_ms IS NULL AND s.id > $1 ORDER BY s.id LIMIT $2"
                ))
                    .bind(after.map_or("", SessionId::as_str))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(Self::session_from_row).collect()
            }

            async fn archive_session(&self, id: &SessionId) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE sessions SET archived_at_ms = $2 WHERE id = $1 AND archived_at_ms IS NULL",
                )
                .bind(id.as_str())
                .bind(Utc::now().timestamp_millis())
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn acquire_session(
                &self,
                id: &SessionId,
                node: &str,
                ttl: Duration,
            ) -> Result<Ownership, StoreError> {
                if !$shared {
                    return Ok(Ownership::Acquired(Fence { node: node.to_owned(), epoch: 0 }));
                }
                let now = Utc::now().timestamp_millis();
                let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                let taken = sqlx::query(
                    "INSERT INTO session_owners (session_id, node_id, epoch, expires_at_ms) \
                     VALUES ($1, $2, 1, $3) ON CONFLICT (session_id) DO UPDATE SET \
                     node_id = excluded.node_id, epoch = session_owners.epoch + 1, \
                     expires_at_ms = excluded.expires_at_ms \
                     WHERE session_owners.expires_at_ms <= $4 \
                     OR session_owners.node_id = excluded.node_id \
                     RETURNING epoch",
                )
                .bind(id.as_str())
                .bind(node)
                .bind(expires)
                .bind(now)
                .fetch_optional(&self.writer)
                .await?;
                if let Some(row) = taken {
                    return Ok(Ownership::Acquired(Fence {
                        node: node.to_owned(),
                        epoch: row.try_get("epoch")?,
                    }));
                }
                let holder = sqlx::query(
                    "SELECT node_id, expires_at_ms FROM session_owners WHERE session_id = $1",
                )
                .bind(id.as_str())
                .fetch_one(&self.writer)
                .await?;
                Ok(Ownership::HeldBy {
                    node: holder.try_get("node_id")?,
                    until: millis_to_time(holder.try_get("expires_at_ms")?)?,
                })
            }

            async fn renew_sessions(
                &self,
                node: &str,
                ttl: Duration,
            ) -> Result<Vec<(SessionId, i64)>, StoreError> {
                if !$shared {
                    return Ok(Vec::new());
                }
                let expires = Utc::now()
                    .timestamp_millis()
                    .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                let rows = sqlx::query(
                    // Locks in id order, as a group commit does, so the two never deadlock.
                    "UPDATE session_owners SET expires_at_ms = $2 WHERE node_id = $1 \
                     AND session_id IN (SELECT session_id FROM session_owners \
                     WHERE node_id = $1 AND expires_at_ms > 0 ORDER BY session_id FOR UPDATE) \
                     RETURNING session_id, epoch",
                )
                .bind(node)
                .bind(expires)
                .fetch_all(&self.writer)
                .await?;
                rows.iter()
                    .map(|row| {
                        let id: String = row.try_get("session_id")?;
                        Ok((stored_id(&id, SessionId::parse)?, row.try_get("epoch")?))
                    })
                    .collect()
            }

            async fn release_session(&self, id: &SessionId, fence: &Fence) -> Result<(), StoreError> {
                if !$shared {
                    return Ok(());
                }
                sqlx::query(
                    "UPDATE session_owners SET expires_at_ms = 0 \
                     WHERE session_id = $1 AND node_id = $2 AND epoch = $3",
                )
                .bind(id.as_str())
                .bind(&fence.node)
                .bind(fence.epoch)
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn commit_batch(
                &self,
                id: &SessionId,
                fence: &Fence,
                events: &[Event],
                updates: &[DocUpdate],
            ) -> Result<(), StoreError> {
                if events.is_empty() && updates.is_empty() {
                    return Ok(());
                }
                let part = GroupPart { session: id, fence, events, updates };
                match self.write_group(&[part]).await?.as_slice() {
                    [true] => Ok(()),
                    _ => Err(StoreError::Deposed),
                }
            }

            async fn commit_group(&self, batches: &[SessionBatch]) -> Vec<Result<(), StoreError>> {
                let parts: Vec<GroupPart<'_>> = batches.iter().map(GroupPart::of).collect();
                let err = match self.write_group(&parts).await {
                    Ok(held) => {
                        return held
                            .into_iter()
                            .map(|held| if held { Ok(()) } else { Err(StoreError::Deposed) })
                            .collect();
                    }
                    Err(err) => err,
                };
                if batches.len() == 1 {
                    return vec![Err(err)];
                }
                if let StoreError::Database(sqlx::Error::Database(cause)) = &err {
                    // A statement failed, not the connection: one batch may be at fault (or
                    // the transaction lost a deadlock). Alone, the others still go through.
                    tracing::warn!(%cause, sessions = batches.len(), "a group commit failed; committing its batches one by one");
                    let mut results = Vec::with_capacity(batches.len());
                    for part in &parts {
                        let result = self
                            .commit_batch(part.session, part.fence, part.events, part.updates)
                            .await;
                        results.push(result);
                    }
                    return results;
                }
                let shared = Arc::new(err);
                batches.iter().map(|_| Err(StoreError::Group(shared.clone()))).collect()
            }

            fn commit_lanes(&self) -> usize {
                // SQLite has one writer; PostgreSQL flushes several transactions at once.
                if $shared { 4 } else { 1 }
            }

            async fn load_docs(&self, id: &SessionId) -> Result<Vec<StoredDoc>, StoreError> {
                let snapshots = sqlx::query(
                    "SELECT doc, upto_seq, version, data FROM doc_snapshots WHERE session_id = $1",
                )
                .bind(id.as_str())
                .fetch_all(&self.pool)
                .await?;
                let mut docs: std::collections::BTreeMap<String, StoredDoc> = Default::default();
                for row in &snapshots {
                    let name: String = row.try_get("doc")?;
                    let doc = doc_name(&name)?;
                    docs.insert(name, StoredDoc {
                        name: doc,
                        snapshot: Some(DocSnapshot {
                            upto_seq: to_offset(row.try_get("upto_seq")?)?,
                            version: to_offset(row.try_get("version")?)?,
                            data: row.try_get("data")?,
                        }),
                        updates: Vec::new(),
                    });
                }
                let updates = sqlx::query(
                    "SELECT u.doc, u.seq, u.version, u.data FROM doc_updates u \
                     LEFT JOIN doc_snapshots s ON s.session_id = u.session_id AND s.doc = u.doc \
                     WHERE u.session_id = $1 AND u.seq > COALESCE(s.upto_seq, 0) \
                     ORDER BY u.doc, u.seq",
                )
                .bind(id.as_str())
                .fetch_all(&self.pool)
                .await?;
                for row in &updates {
                    let name: String = row.try_get("doc")?;
                    let doc = doc_name(&name)?;
                    let update = DocUpdate {
                        doc: doc.clone(),
                        seq: to_offset(row.try_get("seq")?)?,
                        version: to_offset(row.try_get("version")?)?,
                        data: row.try_get("data")?,
                    };
                    docs.entry(name)
                        .or_insert_with(|| StoredDoc { name: doc, snapshot: None, updates: Vec::new() })
                        .updates
                        .push(update);
                }
                Ok(docs.into_values().collect())
            }

            async fn compact_doc(
                &self,
                id: &SessionId,
                fence: &Fence,
                doc: &DocName,
                snapshot: &DocSnapshot,
            ) -> Result<(), StoreError> {
                let mut tx = self.writer.begin().await?;
                if $shared {
                    check_fence!(tx, id, fence);
                }
                sqlx::query(
                    "INSERT INTO doc_snapshots (session_id, doc, upto_seq, version, data) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id, doc) DO UPDATE SET \
                     upto_seq = excluded.upto_seq, version = excluded.version, data = excluded.data",
                )
                .bind(id.as_str())
                .bind(doc.as_str())
                .bind(from_offset(snapshot.upto_seq))
                .bind(from_offset(snapshot.version))
                .bind(snapshot.data.as_slice())
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM doc_updates WHERE session_id = $1 AND doc = $2 AND seq <= $3")
                    .bind(id.as_str())
                    .bind(doc.as_str())
                    .bind(from_offset(snapshot.upto_seq))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn events_after(
                &self,
                id: &SessionId,
                after: u64,
                limit: u32,
            ) -> Result<Vec<Event>, StoreError> {
                let rows = sqlx::query(
                    "SELECT seq, kind, actor_id, actor_name, at_ms, data FROM events \
                     WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(id.as_str())
                .bind(from_offset(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::event_from_row).collect()
            }

            async fn write_tasks(&self, writes: &TaskWrites) -> Result<Vec<Option<Settled>>, StoreError> {
                if writes.is_empty() {
                    return Ok(Vec::new());
                }
                let now = Utc::now().timestamp_millis();
                let mut tx = self.writer.begin_with($begin).await?;
                for chunk in writes.inserts.chunks(500) {
                    let mut insert = QueryBuilder::new(
                        "INSERT INTO tasks (id, session_id, kind, input, priority, max_attempts, \
                         timeout_s, state, attempt, not_before_ms, submitted_by, created_at_ms, \
                         updated_at_ms, target_worker) ",
                    );
                    insert.push_values(chunk, |mut row, task| {
                        let at = task.at.timestamp_millis();
                        row.push_bind(task.id.as_str())
                            .push_bind(task.session.as_str())
                            .push_bind(task.spec.kind.as_str())
                            .push_bind(task.spec.input.get())
                            .push_bind(i64::from(task.spec.priority))
                            .push_bind(i64::from(task.spec.max_attempts))
                            .push_bind(i64::from(task.spec.timeout_s))
                            .push_bind(TaskState::Submitted.as_str())
                            .push_bind(0_i64)
                            .push_bind(at)
                            .push_bind(task.submitted_by.as_str())
                            .push_bind(at)
                            .push_bind(at)
                            .push_bind(task.target.as_ref().map(WorkerId::as_str));
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                let mut settled: Vec<Option<Settled>> = vec![None; writes.settlements.len()];
                // Completions of tasks named once in the batch (the bulk of a busy queue) go in
                // one statement; everything else, one fenced statement each, in order.
                let mut named: HashMap<&str, usize> = HashMap::new();
                for settlement in &writes.settlements {
                    *named.entry(settlement.task.as_str()).or_default() += 1;
                }
                let (bulk, single): (Vec<usize>, Vec<usize>) = (0..writes.settlements.len())
                    .partition(|&i| {
                        let s = &writes.settlements[i];
                        matches!((&s.outcome, &s.expect), (Outcome::Completed { .. }, Expect::Lease(_)))
                            && named.get(s.task.as_str()) == Some(&1)
                    });
                for chunk in bulk.chunks(500) {
                    let mut update = QueryBuilder::new(
                        "UPDATE tasks SET state = 'completed', output = v.column3, lease = NULL, \
                         worker_id = NULL, lease_expires_ms = NULL, deadline_ms = NULL, updated_at_ms = ",
                    );
                    update.push_bind(now).push(" FROM (");
                    update.push_values(chunk, |mut row, &i| {
                        let s = &writes.settlements[i];
                        let (Outcome::Completed { output }, Expect::Lease(lease)) = (&s.outcome, &s.expect) else {
                            return;
                        };
                        row.push_bind(s.task.as_str()).push_bind(lease.as_str()).push_bind(output.get());
                    });
                    update.push(
                        ") AS v WHERE tasks.id = v.column1 AND tasks.state = 'working' \
                         AND tasks.lease = v.column2 RETURNING tasks.id, tasks.session_id, tasks.kind, tasks.attempt",
                    );
                    let rows = update.build().fetch_all(&mut *tx).await?;
                    let mut done: HashMap<String, Settled> = HashMap::with_capacity(rows.len());
                    for row in &rows {
                        done.insert(row.try_get("id")?, Settled {
                            session: stored_id(&row.try_get::<String, _>("session_id")?, SessionId::parse)?,
                            kind: stored_id(&row.try_get::<String, _>("kind")?, TaskKind::parse)?,
                            attempt: to_count(row.try_get::<i64, _>("attempt")?, "attempt")?,
                        });
                    }
                    for &i in chunk {
                        settled[i] = done.remove(writes.settlements[i].task.as_str());
                    }
                }
                for i in single {
                    let settlement = &writes.settlements[i];
                    let (output, error, not_before, attempt_back): (Option<&str>, Option<&str>, Option<i64>, i64) =
                        match &settlement.outcome {
                            Outcome::Completed { output } => (Some(output.get()), None, None, 0),
                            Outcome::Failed { error } => (None, Some(error.as_str()), None, 0),
                            Outcome::Retry { error, not_before } => {
                                (None, Some(error.as_str()), Some(not_before.timestamp_millis()), 0)
                            }
                            Outcome::Release => (None, None, Some(now), 1),
                            Outcome::Canceled => (None, None, None, 0),
                        };
                    let mut update = QueryBuilder::new("UPDATE tasks SET state = ");
                    update
                        .push_bind(settlement.outcome.state().as_str())
                        .push(", lease = NULL, worker_id = NULL, lease_expires_ms = NULL, deadline_ms = NULL")
                        .push(", output = COALESCE(")
                        .push_bind(output)
                        .push(", output), error = COALESCE(")
                        .push_bind(error)
                        .push(", error), not_before_ms = COALESCE(")
                        .push_bind(not_before)
                        .push(", not_before_ms), attempt = attempt - ")
                        .push_bind(attempt_back)
                        .push(", updated_at_ms = ")
                        .push_bind(now)
                        .push(" WHERE id = ")
                        .push_bind(settlement.task.as_str());
                    match &settlement.expect {
                        Expect::Lease(lease) => {
                            update.push(" AND state = 'working' AND lease = ").push_bind(lease.as_str());
                        }
                        Expect::Open => {
                            update.push(" AND state IN ('submitted', 'working')");
                        }
                    }
                    update.push(" RETURNING session_id, kind, attempt");
                    let row = update.build().fetch_optional(&mut *tx).await?;
                    settled[i] = match row {
                        Some(row) => Some(Settled {
                            session: stored_id(&row.try_get::<String, _>("session_id")?, SessionId::parse)?,
                            kind: stored_id(&row.try_get::<String, _>("kind")?, TaskKind::parse)?,
                            attempt: to_count(row.try_get::<i64, _>("attempt")?, "attempt")?,
                        }),
                        None => None,
                    };
                }
                for renewal in &writes.renewals {
                    sqlx::query(
                        "UPDATE tasks SET lease_expires_ms = $2 WHERE worker_id = $1 AND state = 'working'",
                    )
                    .bind(renewal.worker.as_str())
                    .bind(renewal.expires.timestamp_millis())
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(settled)
            }

            async fn claim_tasks(
                &self,
                claim: &Claim,
                slots: &[WorkerId],
            ) -> Result<Vec<(usize, ClaimedTask)>, StoreError> {
                if slots.is_empty() || claim.kinds.is_empty() {
                    return Ok(Vec::new());
                }
                let now = claim.now.timestamp_millis();
                let mut tx = self.writer.begin_with($begin).await?;
                // Priority first; within a priority, each session's oldest task (its turn 1),
                // then each session's second oldest, and so on; among equal turns, the session
                // served longest ago first. That is round-robin across sessions: a flood from one
                // session queues behind a task of every other.
                // (A join to the picked ids, not `id IN (…)`: SQLite 3.51 does not honour the
                // ORDER BY … LIMIT of a windowed subquery under IN.)
                let mut select = QueryBuilder::new(
                    "WITH ranked AS (SELECT t.id, t.priority, t.created_at_ms, \
                     COALESCE(q.served_at_ms, 0) AS served, ROW_NUMBER() OVER \
                     (PARTITION BY t.session_id ORDER BY t.priority DESC, t.created_at_ms, t.id) \
                     AS turn FROM tasks t LEFT JOIN task_sessions q ON q.session_id = t.session_id \
                     WHERE t.state = 'submitted' AND t.not_before_ms <= ",
                );
                // A targeted task is for its worker alone, whatever its kind.
                select.push_bind(now).push(" AND ((t.target_worker IS NULL AND t.kind IN (");
                let mut kinds = select.separated(", ");
                for kind in &claim.kinds {
                    kinds.push_bind(kind.as_str());
                }
                select.push(")) OR t.target_worker IN (");
                let mut workers = select.separated(", ");
                for worker in slots {
                    workers.push_bind(worker.as_str());
                }
                select
                    .push(
                        "))), picked AS (SELECT id, priority, turn, served, created_at_ms FROM ranked \
                         ORDER BY priority DESC, turn, served, created_at_ms, id LIMIT ",
                    )
                    .push_bind(i64::try_from(slots.len()).unwrap_or(i64::MAX))
                    .push(
                        ") SELECT t.id, t.session_id, t.kind, t.input, t.attempt, t.max_attempts, \
                         t.timeout_s, t.target_worker FROM tasks t JOIN picked p ON p.id = t.id \
                         WHERE t.state = 'submitted' \
                         ORDER BY p.priority DESC, p.turn, p.served, p.created_at_ms, p.id",
                    )
                    .push($lock);
                let rows = select.build().fetch_all(&mut *tx).await?;
                let mut claimed = Vec::with_capacity(rows.len());
                let mut served: Vec<String> = Vec::new();
                let mut taken = vec![false; slots.len()];
                for row in &rows {
                    // A targeted task needs a slot of its worker; others take any free slot. A
                    // task with no slot left stays queued (its row lock ends with the claim).
                    let target: Option<String> = row.try_get("target_worker")?;
                    let free = (0..slots.len()).find(|&i| {
                        !taken[i] && target.as_deref().is_none_or(|t| slots[i].as_str() == t)
                    });
                    let Some(slot) = free else { continue };
                    taken[slot] = true;
                    let id = stored_id(&row.try_get::<String, _>("id")?, TaskId::parse)?;
                    let lease = LeaseId::generate();
                    let timeout_s: i64 = row.try_get("timeout_s")?;
                    let deadline = now.saturating_add(timeout_s.saturating_mul(1000));
                    let attempt = to_count(row.try_get::<i64, _>("attempt")?, "attempt")? + 1;
                    let session: String = row.try_get("session_id")?;
                    if !served.contains(&session) {
                        served.push(session.clone());
                    }
                    claimed.push((slot, ClaimedTask {
                        id,
                        lease,
                        session: stored_id(&session, SessionId::parse)?,
                        kind: stored_id(&row.try_get::<String, _>("kind")?, TaskKind::parse)?,
                        input: stored_json(row.try_get("input")?, "input")?,
                        attempt,
                        max_attempts: to_count(row.try_get::<i64, _>("max_attempts")?, "max_attempts")?,
                        deadline: millis_to_time(deadline)?,
                    }));
                }
                // Every claimed task is marked working, under its own lease, in one statement.
                for chunk in claimed.chunks(500) {
                    let mut update = QueryBuilder::new(
                        "UPDATE tasks SET state = 'working', attempt = tasks.attempt + 1, \
                         lease = v.column2, worker_id = v.column3, deadline_ms = ",
                    );
                    update
                        .push_bind(now)
                        .push(" + tasks.timeout_s * 1000, lease_expires_ms = ")
                        .push_bind(now.saturating_add(claim.lease_ttl_ms))
                        .push(", updated_at_ms = ")
                        .push_bind(now)
                        .push(" FROM (");
                    update.push_values(chunk, |mut row, (slot, task)| {
                        row.push_bind(task.id.as_str())
                            .push_bind(task.lease.as_str())
                            .push_bind(slots[*slot].as_str());
                    });
                    update.push(") AS v WHERE tasks.id = v.column1");
                    update.build().execute(&mut *tx).await?;
                }
                for session in &served {
                    sqlx::query(
                        "INSERT INTO task_sessions (session_id, served_at_ms) VALUES ($1, $2) \
                         ON CONFLICT (session_id) DO UPDATE SET served_at_ms = excluded.served_at_ms",
                    )
                    .bind(session)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(claimed)
            }

            async fn expired_leases(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> Result<Vec<ExpiredLease>, StoreError> {
                let now = now.timestamp_millis();
                let rows = sqlx::query(
                    "SELECT id, lease, attempt, max_attempts, deadline_ms FROM tasks \
                     WHERE state = 'working' AND (lease_expires_ms < $1 OR deadline_ms < $1) LIMIT $2",
                )
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let lease: Option<String> = row.try_get("lease")?;
                        let deadline: Option<i64> = row.try_get("deadline_ms")?;
                        Ok(ExpiredLease {
                            task: stored_id(&row.try_get::<String, _>("id")?, TaskId::parse)?,
                            lease: stored_id(lease.as_deref().unwrap_or(""), LeaseId::parse)?,
                            attempt: to_count(row.try_get::<i64, _>("attempt")?, "attempt")?,
                            max_attempts: to_count(row.try_get::<i64, _>("max_attempts")?, "max_attempts")?,
                            timed_out: deadline.is_some_and(|d| d < now),
                        })
                    })
                    .collect()
            }

            async fn save_council(&self, council: &CouncilRow) -> Result<(), StoreError> {
                let now = Utc::now().timestamp_millis();
                sqlx::query(
                    "INSERT INTO councils (id, session_id, state, data, created_at_ms, updated_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                     state = excluded.state, data = excluded.data, updated_at_ms = excluded.updated_at_ms",
                )
                .bind(council.id.as_str())
                .bind(council.session.as_str())
                .bind(council.state)
                .bind(council.data.as_str())
                .bind(council.created_at.timestamp_millis())
                .bind(now)
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn council(&self, id: &CouncilId) -> Result<Option<String>, StoreError> {
                let row = sqlx::query("SELECT data FROM councils WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|row| row.try_get("data")).transpose().map_err(Into::into)
            }

            async fn open_councils(&self) -> Result<Vec<String>, StoreError> {
                let rows = sqlx::query("SELECT data FROM councils WHERE state = 'deliberating'")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(|row| row.try_get("data").map_err(Into::into)).collect()
            }

            async fn task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
                let row = sqlx::query(concat!(select_tasks!(), " WHERE id = $1"))
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(Self::task_from_row).transpose()
            }
        }
    };
}

// SQLite takes its write lock up front: a deferred transaction that reads before it writes
// fails outright (SQLITE_BUSY_SNAPSHOT) when a session commits in between, where an immediate one
// just waits its turn. SQLite has one writer, so it needs no row locks to share a queue.
sql_store!(
    SqliteStore,
    "sqlite",
    sqlx::migrate!("./migrations/sqlite"),
    sqlx::sqlite::SqliteRow,
    begin_write: "BEGIN IMMEDIATE",
    skip_locked: "",
    insert_events: insert_events_sqlite,
    insert_log: SQLITE_INSERT_LOG,
    held_fences: held_fences_sqlite,
    shared: false
);
sql_store!(
    PgStore,
    "postgres",
    sqlx::migrate!("./migrations/postgres"),
    sqlx::postgres::PgRow,
    begin_write: "BEGIN",
    skip_locked: " FOR UPDATE OF t SKIP LOCKED",
    insert_events: insert_events_pg,
    insert_log: "INSERT INTO",
    held_fences: held_fences_pg,
    shared: true
);
