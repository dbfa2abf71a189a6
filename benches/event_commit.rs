//! Criterion: one group commit of a session's events, straight into the store, as the session
//! actor makes it (`Store::commit_batch`: one transaction, the events inserted in one statement,
//! then the commit, durable before it returns), for batches of 1, 16 and 128 chat events; and
//! one node-wide group as a busy node makes it (`Store::commit_group`): one event from each of
//! 16 sessions out of 1,000, whose logs already hold 64 events each. The second is what the
//! storage layout decides: each session's rows go to their own place in its key's order.
//!
//! SQLite runs in a temporary directory (WAL, `synchronous=FULL`, so every commit is an `fsync`
//! of the filesystem behind `TMPDIR`); PostgreSQL in a fresh database on 127.0.0.1:5432, created
//! and dropped with `psql`. The log grows as the bench runs, as a live session's does.
//!
//! ```text
//! cargo bench --bench event_commit
//! BENCH_BACKENDS=sqlite cargo bench --bench event_commit -- 'sqlite/16'
//! BENCH_BACKENDS=sqlite cargo bench --bench event_commit -- 'spread'
//! ```

#[path = "support/scratch_db.rs"]
mod scratch_db;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use conclave::protocol::SessionId;
use conclave::session::log::{Actor, Event, EventKind};
use conclave::store::{
    Fence, Ownership, PgStore, SessionBatch, SharedStore, SqliteStore, Store as _,
};
use criterion::{BenchmarkId, Criterion, Throughput};
use scratch_db::ScratchDatabase;
use serde_json::value::RawValue;
use tokio::runtime::Runtime;

const BATCH_SIZES: [u64; 3] = [1, 16, 128];

/// The spread group: sessions on the node, sessions per group, events already in each log.
const SESSIONS: usize = 1000;
const GROUP: usize = 16;
const PREFILLED: u64 = 64;
/// Consecutive groups take sessions this far apart (prime to `SESSIONS`), so that a group's
/// sessions are scattered over the key space as a live node's are.
const STRIDE: usize = 61;

/// A chat as the session log stores it: a short text and the client's ref.
fn chat(offset: u64) -> Event {
    let data =
        format!(r#"{{"text":"message {offset}: the quick brown fox jumps over the lazy dog"}}"#);
    Event {
        offset,
        kind: EventKind::Chat,
        actor: Actor {
            id: "u-bench".into(),
            name: "bench".into(),
        },
        at: Utc::now(),
        data: RawValue::from_string(data).expect("literal JSON"),
    }
}

/// Opens `session` and takes its lease, as its owner does: on PostgreSQL every commit is fenced
/// on it.
fn owned(runtime: &Runtime, store: &SharedStore, session: &SessionId) -> Fence {
    runtime
        .block_on(store.open_session(session))
        .expect("creating the bench session");
    match runtime
        .block_on(store.acquire_session(session, "bench", Duration::from_secs(3600)))
        .expect("taking the session's lease")
    {
        Ownership::Acquired(fence) => fence,
        Ownership::HeldBy { node, .. } => panic!("the bench session is held by {node}"),
    }
}

/// One node-wide group commit of one event from each of `GROUP` sessions out of `SESSIONS`.
fn bench_spread_group(c: &mut Criterion, runtime: &Runtime, label: &str, store: SharedStore) {
    let sessions: Vec<(SessionId, Fence)> = (0..SESSIONS)
        .map(|index| {
            let session =
                SessionId::parse(&format!("spread-{index:04}")).expect("valid session name");
            let fence = owned(runtime, &store, &session);
            (session, fence)
        })
        .collect();
    let batch = |(session, fence): &(SessionId, Fence), events: Vec<Event>| SessionBatch {
        session: session.clone(),
        fence: fence.clone(),
        events,
        updates: Vec::new(),
    };
    for chunk in sessions.chunks(64) {
        let group: Vec<SessionBatch> = chunk
            .iter()
            .map(|owned| batch(owned, (1..=PREFILLED).map(chat).collect()))
            .collect();
        for result in runtime.block_on(store.commit_group(&group)) {
            result.expect("prefilling the logs");
        }
    }
    let mut offsets = vec![PREFILLED; SESSIONS];
    let mut turn = 0;
    let mut group = c.benchmark_group(format!("event_commit/{label}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(GROUP as u64));
    group.bench_function(format!("spread/{GROUP}of{SESSIONS}"), |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let batches: Vec<SessionBatch> = (0..GROUP)
                    .map(|_| {
                        turn = (turn + STRIDE) % SESSIONS;
                        offsets[turn] += 1;
                        batch(&sessions[turn], vec![chat(offsets[turn])])
                    })
                    .collect();
                let start = Instant::now();
                for result in runtime.block_on(store.commit_group(&batches)) {
                    result.expect("the group commits");
                }
                took += start.elapsed();
            }
            took
        });
    });
    group.finish();
}

/// Benches every batch size on `store`, each in a session of its own, with offsets that go on
/// from one iteration to the next as the log's do.
fn bench_store(c: &mut Criterion, runtime: &Runtime, label: &str, store: SharedStore) {
    let mut group = c.benchmark_group(format!("event_commit/{label}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for size in BATCH_SIZES {
        let session = SessionId::parse(&format!("bench-{size}")).expect("valid session name");
        let fence = owned(runtime, &store, &session);
        let next = Arc::new(AtomicU64::new(1));
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.to_async(runtime).iter_custom(|iters| {
                let store = store.clone();
                let (session, fence) = (session.clone(), fence.clone());
                let next = next.clone();
                async move {
                    let mut took = Duration::ZERO;
                    for _ in 0..iters {
                        let first = next.fetch_add(size, Ordering::Relaxed);
                        let events: Vec<Event> = (first..first + size).map(chat).collect();
                        let start = Instant::now();
                        store
                            .commit_batch(&session, &fence, &events, &[])
                            .await
                            .expect("the batch commits");
                        took += start.elapsed();
                    }
                    took
                }
            });
        });
    }
    group.finish();
}

fn backends() -> Vec<String> {
    std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "sqlite,postgres".into())
        .split(',')
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let runtime = Runtime::new().expect("building the tokio runtime");
    for backend in backends() {
        match backend.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir().expect("creating a temporary directory");
                let store = runtime
                    .block_on(SqliteStore::connect(&dir.path().join("bench.sqlite3")))
                    .expect("opening SQLite");
                runtime.block_on(store.migrate()).expect("migrating SQLite");
                let store: SharedStore = Arc::new(store);
                bench_store(&mut criterion, &runtime, "sqlite", store.clone());
                bench_spread_group(&mut criterion, &runtime, "sqlite", store);
            }
            "postgres" => {
                let database = ScratchDatabase::create().unwrap_or_else(|err| {
                    panic!(
                        "{err:#}\nThe PostgreSQL bench needs a server on 127.0.0.1:5432 (user \
                         postgres, trust auth); run it with BENCH_BACKENDS=sqlite without one."
                    )
                });
                println!("created database {}", database.name());
                let store = runtime
                    .block_on(PgStore::connect(&database.url()))
                    .expect("connecting to the scratch database");
                runtime
                    .block_on(store.migrate())
                    .expect("migrating PostgreSQL");
                let store: SharedStore = Arc::new(store);
                bench_store(&mut criterion, &runtime, "postgres", store.clone());
                bench_spread_group(&mut criterion, &runtime, "postgres", store);
            }
            other => panic!("BENCH_BACKENDS: unknown backend {other:?} (sqlite, postgres)"),
        }
    }
    criterion.final_summary();
}
