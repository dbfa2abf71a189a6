//! Metrics: one place that names every series, installs the Prometheus recorder once per process
//! and renders `/metrics`.
//!
//! Call sites use the small functions here rather than the `metrics` macros, so a series' name
//! and labels are written once.
//!
//! The standard Prometheus process series (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_virtual_memory_bytes`, CPU seconds, threads, …) come from `metrics-process`, read from
//! `/proc/self` at each scrape: `conclave load idle` divides the resident memory by the sockets
//! open, and an operator sees memory and descriptors without a node exporter.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_process::Collector;

use crate::protocol::ErrorCode;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Reads the process series into the recorder; described once, collected at every render.
static PROCESS: OnceLock<Collector> = OnceLock::new();

/// Installs the process-wide recorder (idempotent: tests start many servers in one process).
pub fn install() {
    RECORDER.get_or_init(|| {
        let buckets = [
            0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0,
        ];
        let built = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("conclave_commit_group_sessions".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                )
            })
            .and_then(|builder| builder.install_recorder());
        match built {
            Ok(handle) => {
                PROCESS.get_or_init(Collector::default).describe();
                Some(handle)
            }
            Err(err) => {
                tracing::error!(%err, "metrics recorder could not be installed; /metrics is empty");
                None
            }
        }
    });
}

/// The Prometheus text exposition of every series, with the process figures read just now.
pub fn render() -> String {
    let Some(handle) = RECORDER.get().and_then(Option::as_ref) else {
        return String::new();
    };
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.render()
}

pub fn connection_opened(kind: &'static str) {
    gauge!("conclave_connections", "kind" => kind).increment(1.0);
    counter!("conclave_connections_total", "kind" => kind).increment(1);
}

pub fn connection_closed(kind: &'static str) {
    gauge!("conclave_connections", "kind" => kind).decrement(1.0);
}

pub fn session_activated() {
    gauge!("conclave_sessions_live").increment(1.0);
}

pub fn session_retired() {
    gauge!("conclave_sessions_live").decrement(1.0);
}

pub fn message_in() {
    counter!("conclave_messages_in_total").increment(1);
}

pub fn messages_out(n: usize) {
    counter!("conclave_messages_out_total").increment(n as u64);
}

pub fn error(code: ErrorCode) {
    counter!("conclave_errors_total", "code" => code.as_str()).increment(1);
}

pub fn commit_latency(backend: &'static str, took: Duration, events: usize) {
    histogram!("conclave_commit_seconds", "backend" => backend).record(took.as_secs_f64());
    counter!("conclave_committed_events_total", "backend" => backend).increment(events as u64);
}

/// How many sessions' batches one group commit carried.
pub fn commit_group(sessions: usize) {
    histogram!("conclave_commit_group_sessions").record(sessions as f64);
}

pub fn auth_failure(door: &'static str, reason: &'static str) {
    counter!("conclave_auth_failures_total", "door" => door, "reason" => reason).increment(1);
}

pub fn slow_consumer(kind: &'static str) {
    counter!("conclave_slow_consumers_total", "kind" => kind).increment(1);
}

/// A bus message that did not decode, dropped.
pub fn bus_corrupt() {
    counter!("conclave_bus_corrupt_total").increment(1);
}

/// Whether the cluster bus reaches the other nodes (1) or not (0).
pub fn bus_up(up: bool) {
    gauge!("conclave_bus_up").set(if up { 1.0 } else { 0.0 });
}

/// A session this node served was taken over by another node's lease.
pub fn session_deposed() {
    counter!("conclave_sessions_deposed_total").increment(1);
}

pub fn actor_restart(kind: &'static str) {
    counter!("conclave_actor_restarts_total", "kind" => kind).increment(1);
}

pub fn actor_panic(kind: &'static str) {
    counter!("conclave_actor_panics_total", "kind" => kind).increment(1);
}

pub fn supervisor_gave_up(kind: &'static str) {
    counter!("conclave_supervisor_gave_up_total", "kind" => kind).increment(1);
}

/// A task entered `state` (`retrying` for a retry scheduled with backoff).
pub fn task_transition(state: &'static str) {
    counter!("conclave_task_transitions_total", "state" => state).increment(1);
}

pub fn task_write_failed() {
    counter!("conclave_task_write_failures_total").increment(1);
}

/// Workers connected to this node, moved by `delta`.
pub fn workers_connected(delta: i32) {
    gauge!("conclave_workers_connected").increment(f64::from(delta));
}
