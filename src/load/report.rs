//! The report of one run: a human summary table, or one JSON object for machines (`--json`).
//!
//! Every scenario fills the same [`Report`]; fields that do not apply stay empty and are left
//! out of the table (and are `null` or empty in JSON), so one reader handles every scenario.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::conduct::{StopReason, Timeline};
use super::cpu::CpuUse;
use super::stats::{Errors, Summary, per_second};

/// How far below the asked rate a run may send before [`Report::note_shortfall`] speaks: a
/// client's first tick falls anywhere in its first period, so a short run sends a little less
/// than rate × time even when the generator keeps up.
const SHORTFALL: f64 = 0.05;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    pub attempted: u64,
    pub opened: u64,
    pub failed: u64,
    /// Opened, then ended by the target (closed, reset or gone) before the run closed it.
    pub dropped: u64,
}

/// A counter, shown with its rate over the measured time when `rate` is set. Names are
/// snake_case (JSON keys); the table shows them with spaces.
#[derive(Debug, Clone)]
pub struct Count {
    pub name: &'static str,
    pub value: u64,
    pub rate: bool,
}

/// Whether the clients ended in agreement, with the first few disagreements.
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    pub passed: bool,
    /// What was compared, e.g. "10 sessions, 100 clients, 5123 events".
    pub checked: String,
    pub failures: Vec<String>,
}

/// Resident memory of the server around the idle sockets.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// `pid 1234` or `/metrics`.
    pub source: String,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub sockets: u64,
    pub bytes_per_socket: f64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: &'static str,
    pub url: String,
    pub params: Vec<(&'static str, Value)>,
    pub stopped_by: StopReason,
    /// The measured phase, which every rate is divided by.
    pub elapsed: Duration,
    pub connections: Connections,
    pub counts: Vec<Count>,
    pub latencies: Vec<(&'static str, Summary)>,
    pub errors: Errors,
    pub convergence: Option<Convergence>,
    pub memory: Option<Memory>,
    /// Cores used over the measured phase, by the load generator and (with `--pid`) the server.
    pub cpu: Option<CpuUse>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str, url: String) -> Self {
        Self {
            scenario,
            url,
            params: Vec::new(),
            stopped_by: StopReason::Duration,
            elapsed: Duration::ZERO,
            connections: Connections::default(),
            counts: Vec::new(),
            latencies: Vec::new(),
            errors: Errors::default(),
            convergence: None,
            memory: None,
            cpu: None,
            notes: Vec::new(),
        }
    }

    /// A report for a run that went as `timeline` says.
    pub fn of_run(scenario: &'static str, url: String, timeline: Timeline) -> Self {
        Self {
            stopped_by: timeline.stopped_by,
            elapsed: timeline.elapsed,
            notes: timeline.notes,
            cpu: timeline.cpu,
            ..Self::new(scenario, url)
        }
    }

    pub fn param(&mut self, name: &'static str, value: impl Into<Value>) {
        self.params.push((name, value.into()));
    }

    pub fn count(&mut self, name: &'static str, value: u64, rate: bool) {
        self.counts.push(Count { name, value, rate });
    }

    pub fn to_json(&self) -> Value {
        let params: Map<String, Value> = self
            .params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let counts: Map<String, Value> = self
            .counts
            .iter()
            .map(|c| (c.name.to_owned(), json!(c.value)))
            .collect();
        let rates: Map<String, Value> = self
            .counts
            .iter()
            .filter(|c| c.rate)
            .map(|c| {
                let rate = (per_second(c.value, self.elapsed) * 10.0).round() / 10.0;
                (format!("{}_per_s", c.name), json!(rate))
            })
            .collect();
        let latencies: Map<String, Value> = self
            .latencies
            .iter()
            .map(|(k, s)| ((*k).to_owned(), json!(s)))
            .collect();
        json!({
            "scenario": self.scenario,
            "url": self.url,
            "params": params,
            "stopped_by": self.stopped_by.as_str(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "connections": self.connections,
            "counts": counts,
            "rates": rates,
            "latency_ms": latencies,
            "errors": self.errors.counts,
            "error_samples": self.errors.samples,
            "convergence": self.convergence,
            "memory": self.memory,
            "cpu": self.cpu,
            "notes": self.notes,
        })
    }

    /// Says so when the clients sent clearly less than `rate_per_client` asked of them over a
    /// run that went its whole duration: the generator fell behind its own schedule (ticks
    /// missed for longer than `conduct::MAX_CATCH_UP` are dropped), so the target saw less
    /// load than the parameters say, and a reader comparing runs by `--rate` would be misled.
    /// `held_back` counts sends the clients skipped for the target's sake (a full window),
    /// which are the target's doing, not the generator's.
    pub fn note_shortfall(&mut self, rate_per_client: f64, held_back: u64) {
        if self.stopped_by != StopReason::Duration || self.connections.dropped > 0 {
            return;
        }
        let secs = self.elapsed.as_secs_f64();
        let asked = rate_per_client * self.connections.opened as f64 * secs;
        let sent = self
            .counts
            .iter()
            .find(|c| c.name == "sent")
            .map_or(0, |c| c.value)
            + held_back;
        if secs <= 0.0 || asked <= 0.0 || sent as f64 >= asked * (1.0 - SHORTFALL) {
            return;
        }
        self.notes.push(format!(
            "the clients sent {:.0}/s of the {:.0}/s asked ({:.0}%): the load generator fell \
             behind its own schedule, so the target saw less load than asked (clients that \
             connected late, or a generator short of CPU: give it cores of its own, or lower \
             --rate or --clients)",
            sent as f64 / secs,
            asked / secs,
            100.0 * sent as f64 / asked
        ));
    }

    /// The human summary: a header, then one table per kind of figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "conclave load {} → {}", self.scenario, self.url);
        if !self.params.is_empty() {
            let params: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            let _ = writeln!(out, "  {}", params.join(" "));
        }
        let c = &self.connections;
        let dropped = if c.dropped > 0 {
            format!(", {} dropped by the target", c.dropped)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  measured {:.2} s (stopped by {}); connections: {} opened, {} failed{dropped}, of {}",
            self.elapsed.as_secs_f64(),
            self.stopped_by.as_str(),
            c.opened,
            c.failed,
            c.attempted
        );
        if let Some(cpu) = &self.cpu {
            let _ = writeln!(out, "  {}", cpu_line(cpu));
        }
        if !self.counts.is_empty() {
            let _ = writeln!(out, "\n  {:<22} {:>12} {:>12}", "count", "total", "per s");
            for count in &self.counts {
                let rate = if count.rate {
                    format!("{:.1}", per_second(count.value, self.elapsed))
                } else {
                    String::new()
                };
                let name = count.name.replace('_', " ");
                let _ = writeln!(out, "  {name:<22} {:>12} {rate:>12}", count.value);
            }
        }
        if !self.latencies.is_empty() {
            let _ = writeln!(
                out,
                "\n  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
            );
            for (name, s) in &self.latencies {
                let _ = writeln!(
                    out,
                    "  {:<22} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    name.replace('_', " "),
                    s.count,
                    s.p50_ms,
                    s.p90_ms,
                    s.p99_ms,
                    s.p999_ms,
                    s.max_ms,
                    s.mean_ms
                );
            }
        }
        out.push('\n');
        if self.errors.counts.is_empty() {
            let _ = writeln!(out, "  errors: none");
        } else {
            let by_code: Vec<String> = self
                .errors
                .counts
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            let _ = writeln!(out, "  errors: {}", by_code.join(", "));
            for (code, sample) in &self.errors.samples {
                let _ = writeln!(out, "    e.g. {code}: {sample}");
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                out,
                "  memory ({}): RSS {:.1} MiB → {:.1} MiB with {} sockets: {:.0} bytes per socket",
                m.source,
                mib(m.rss_before_bytes),
                mib(m.rss_after_bytes),
                m.sockets,
                m.bytes_per_socket
            );
        }
        if let Some(conv) = &self.convergence {
            let verdict = if conv.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "  convergence: {verdict} ({})", conv.checked);
            for failure in &conv.failures {
                let _ = writeln!(out, "    {failure}");
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// "cpu over the measured phase: load generator 0.70 cores, server (pid 42) 1.22 cores", with
/// "unknown" for a figure `/proc` did not give and a hint where no pid was given.
fn cpu_line(cpu: &CpuUse) -> String {
    let cores = |c: Option<f64>| c.map_or("unknown".to_owned(), |c| format!("{c:.2} cores"));
    let server = match cpu.server_pid {
        Some(pid) => format!("server (pid {pid}) {}", cores(cpu.server_cores)),
        None => "server unknown (give --pid)".to_owned(),
    };
    format!(
        "cpu over the measured phase: load generator {}, {server}",
        cores(cpu.load_generator_cores)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::stats::Latency;

    fn run_of(sent: u64, opened: u64, secs: u64) -> Report {
        let mut r = Report::new("yjs", "ws://127.0.0.1:8080/".into());
        r.elapsed = Duration::from_secs(secs);
        r.connections = Connections {
            attempted: opened,
            opened,
            failed: 0,
            dropped: 0,
        };
        r.count("sent", sent, true);
        r
    }

    /// 100 clients asked for 1,200/s each over 20 s sent 1,837,480 (77%): the note says so,
    /// with both rates.
    #[test]
    fn a_generator_behind_its_schedule_is_named() {
        let mut r = run_of(1_837_480, 100, 20);
        r.note_shortfall(1200.0, 0);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(
            r.notes[0].contains("91874/s of the 120000/s asked (77%)"),
            "{}",
            r.notes[0]
        );
        assert!(r.render().contains("fell behind its own schedule"));
    }

    /// Within the margin, sends held back by a full window, a run that stopped early, and a
    /// run the target cut short get no such note.
    #[test]
    fn a_run_that_kept_its_schedule_gets_no_note() {
        let mut close = run_of(96_000, 100, 10);
        close.note_shortfall(100.0, 0);
        let mut held = run_of(50_000, 100, 10);
        held.note_shortfall(100.0, 48_000);
        let mut counted = run_of(10, 100, 10);
        counted.stopped_by = StopReason::Count;
        counted.note_shortfall(100.0, 0);
        let mut dropped = run_of(10, 100, 10);
        dropped.connections.dropped = 3;
        dropped.note_shortfall(100.0, 0);
        for r in [close, held, counted, dropped] {
            assert!(r.notes.is_empty(), "{:?}", r.notes);
        }
    }

    fn sample() -> Report {
        let mut r = Report::new("native", "ws://127.0.0.1:8080/".into());
        r.param("sessions", 2);
        r.param("rate", "10/s");
        r.elapsed = Duration::from_secs(2);
        r.connections = Connections {
            attempted: 4,
            opened: 4,
            failed: 0,
            dropped: 1,
        };
        r.count("sent", 100, true);
        r.count("skipped_window_full", 3, false);
        let mut l = Latency::default();
        l.record_us(1500);
        r.latencies.push(("ack", l.summary()));
        r.errors.add_detail("rate_limited", || "slow down".into());
        r.convergence = Some(Convergence {
            passed: false,
            checked: "2 sessions".into(),
            failures: vec!["session a: client 1 missed 58".into()],
        });
        r
    }

    #[test]
    fn json_has_counts_rates_and_verdict() {
        let v = sample().to_json();
        assert_eq!(v["scenario"], "native");
        assert_eq!(v["counts"]["sent"], 100);
        assert_eq!(v["rates"]["sent_per_s"], 50.0);
        assert_eq!(v["counts"]["skipped_window_full"], 3);
        assert!(v["rates"].get("skipped_window_full_per_s").is_none());
        assert_eq!(v["error_samples"]["rate_limited"], "slow down");
        assert_eq!(v["latency_ms"]["ack"]["count"], 1);
        assert_eq!(v["errors"]["rate_limited"], 1);
        assert_eq!(v["convergence"]["passed"], false);
        assert_eq!(v["params"]["sessions"], 2);
        assert!(v["memory"].is_null());
        assert_eq!(v["stopped_by"], "duration");
    }

    #[test]
    fn table_shows_each_figure() {
        let text = sample().render();
        assert!(text.contains("conclave load native"), "{text}");
        assert!(text.contains("sessions=2 rate=10/s"), "{text}");
        assert!(text.contains("50.0"), "{text}");
        assert!(text.contains("1.50"), "{text}");
        assert!(text.contains("rate_limited 1"), "{text}");
        assert!(text.contains("e.g. rate_limited: slow down"), "{text}");
        assert!(text.contains("skipped window full"), "{text}");
        assert!(text.contains("convergence: FAIL (2 sessions)"), "{text}");
        assert!(text.contains("client 1 missed 58"), "{text}");
    }

    #[test]
    fn memory_line() {
        let mut r = Report::new("idle", "ws://127.0.0.1:8080/".into());
        r.memory = Some(Memory {
            source: "pid 1".into(),
            rss_before_bytes: 10 << 20,
            rss_after_bytes: 20 << 20,
            sockets: 1024,
            bytes_per_socket: 10240.0,
        });
        let text = r.render();
        assert!(
            text.contains("10.0 MiB → 20.0 MiB with 1024 sockets: 10240 bytes"),
            "{text}"
        );
        assert!(text.contains("errors: none"));
        assert_eq!(r.to_json()["memory"]["sockets"], 1024);
    }
}
