//! Live counters and the progress bar drawn from them.
//!
//! Clients bump relaxed atomics ([`Live`]); a ticker task redraws an indicatif bar from them a
//! few times a second, so the bar costs the clients nothing. The bar draws on stderr and is
//! hidden with `--json` or when stderr is not a terminal, so stdout stays clean for the report.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

/// Counters every client bumps as it goes; read only for display (the report is built from
/// the clients' own results).
#[derive(Debug, Default)]
pub struct Live {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
}

impl Live {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What the bar's position follows.
#[derive(Debug, Clone, Copy)]
pub enum Track {
    /// Connections opened or failed, of `len`.
    Connections,
    /// Messages sent, of `len`.
    Sent,
    /// Tasks completed, of `len`.
    Completed,
    /// Time since `started`, `len` being the bound in milliseconds.
    Elapsed(Instant),
}

struct Stage {
    name: &'static str,
    len: u64,
    track: Track,
}

/// The bar and the task that redraws it.
pub struct Progress {
    bar: ProgressBar,
    stage: Arc<Mutex<Stage>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(hidden: bool, live: Arc<Live>) -> Self {
        let target = if hidden || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(1), target);
        let style = ProgressStyle::with_template(
            "{spinner} {prefix:>7} [{elapsed_precise}] [{bar:24}] {percent:>3}% {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let stage = Arc::new(Mutex::new(Stage {
            name: "connect",
            len: 1,
            track: Track::Connections,
        }));
        let ticker = {
            let bar = bar.clone();
            let stage = stage.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(200));
                loop {
                    every.tick().await;
                    redraw(&bar, &stage, &live);
                }
            })
        };
        Self { bar, stage, ticker }
    }

    /// Switches the bar to a new stage of the run.
    pub fn stage(&self, name: &'static str, len: u64, track: Track) {
        if let Ok(mut stage) = self.stage.lock() {
            *stage = Stage {
                name,
                len: len.max(1),
                track,
            };
        }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

fn redraw(bar: &ProgressBar, stage: &Mutex<Stage>, live: &Live) {
    let Ok(stage) = stage.lock() else {
        return;
    };
    let pos = match stage.track {
        Track::Connections => Live::get(&live.connected) + Live::get(&live.failed),
        Track::Sent => Live::get(&live.sent),
        Track::Completed => Live::get(&live.completed),
        Track::Elapsed(started) => u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    bar.set_prefix(stage.name);
    bar.set_length(stage.len);
    bar.set_position(pos.min(stage.len));
    bar.set_message(format!(
        "conns {} (failed {}) sent {} acked {} delivered {} completed {} errors {}",
        Live::get(&live.connected),
        Live::get(&live.failed),
        Live::get(&live.sent),
        Live::get(&live.acked),
        Live::get(&live.delivered),
        Live::get(&live.completed),
        Live::get(&live.errors),
    ));
}
