//! The SQL both backends share, instantiated once for SQLite and once for PostgreSQL.
//!
//! The statements use `$N` placeholders, which both sqlx drivers bind by number, so one body of
//! code serves both. A macro stamps it out per backend instead of a generic over
//! `sqlx::Database`, whose executor bounds would bury the SQL. Queries are runtime queries, so
//! a clean clone builds with no database up.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::value::RawValue;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::{DocSnapshot, DocUpdate, SessionRecord, Store, StoreError, StoredDoc};
use crate::protocol::{DocName, SessionId};
use crate::session::log::{Actor, Event, EventKind};

/// The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so that a commit is
/// on disk before it is acked.
pub struct SqliteStore {
    pool: SqlitePool,
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
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

/// The shared store of a cluster, and the store of any node given `DATABASE_URL`.
pub struct PgStore {
    pool: PgPool,
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
        Ok(Self { pool })
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

/// The columns of a [`SessionRecord`], as a literal so that `concat!` can extend it.
macro_rules! select_sessions {
    () => {
        "SELECT s.id, s.title, s.epoch, s.created_at_ms, s.archived_at_ms, \
         COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.session_id = s.id), 0) AS last_seq \
         FROM sessions s"
    };
}

macro_rules! sql_store {
    ($store:ty, $backend:literal, $migrator:expr, $row:ty) => {
        impl $store {
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
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn migrate(&self) -> Result<(), StoreError> {
                $migrator.run(&self.pool).await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
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
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn commit_batch(
                &self,
                id: &SessionId,
                events: &[Event],
                updates: &[DocUpdate],
            ) -> Result<(), StoreError> {
                if events.is_empty() && updates.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                // A bounded number of rows per statement keeps every backend under its bind limit.
                for chunk in events.chunks(1000) {
                    let mut insert = QueryBuilder::new(
                        "INSERT INTO events (session_id, seq, kind, actor_id, actor_name, at_ms, data) ",
                    );
                    insert.push_values(chunk, |mut row, event| {
                        row.push_bind(id.as_str())
                            .push_bind(from_offset(event.offset))
                            .push_bind(event.kind.as_str())
                            .push_bind(event.actor.id.as_str())
                            .push_bind(event.actor.name.as_str())
                            .push_bind(event.at.timestamp_millis())
                            .push_bind(event.data.get());
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                for chunk in updates.chunks(1000) {
                    let mut insert =
                        QueryBuilder::new("INSERT INTO doc_updates (session_id, doc, seq, version, data) ");
                    insert.push_values(chunk, |mut row, update| {
                        row.push_bind(id.as_str())
                            .push_bind(update.doc.as_str())
                            .push_bind(from_offset(update.seq))
                            .push_bind(from_offset(update.version))
                            .push_bind(update.data.as_slice());
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
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
                doc: &DocName,
                snapshot: &DocSnapshot,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
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
        }
    };
}

sql_store!(
    SqliteStore,
    "sqlite",
    sqlx::migrate!("./migrations/sqlite"),
    sqlx::sqlite::SqliteRow
);
sql_store!(
    PgStore,
    "postgres",
    sqlx::migrate!("./migrations/postgres"),
    sqlx::postgres::PgRow
);
