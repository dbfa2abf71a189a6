//! The run's timeline, shared by every scenario: phases broadcast to the clients, the stage
//! each client has reached, Ctrl-C, and bounded waits.
//!
//! The conductor moves the run through [`Phase`]s with a `watch` channel; each client task
//! reports how far it got through an atomic [`stage`] in a shared slice. The conductor never
//! waits on a client directly (a stuck or failed client cannot hang it): it polls the stages
//! with a deadline, and a client that ended for any reason counts as having reached every stage.
//! The first Ctrl-C stops sending and lets the run drain and report; a second one cuts the drain
//! short.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::cpu::{CpuSample, CpuUse};
use super::progress::{Live, Progress, Track};
use super::report::Connections;
use super::stats::{Errors, now_us};
use super::{CommonArgs, LoadError, measured_bound};

/// What the conductor asks of every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connect (at your ramp slot), say hello, join, then wait.
    Ramp,
    /// The measured phase: send.
    Run,
    /// Stop sending; keep reading until every request is answered.
    Stop,
    /// Read until you have seen the run's last change (targets are set before this).
    Drain,
    /// Close the socket and return what you measured.
    Close,
}

/// How far a client got. Stages only go up; a client that ended is [`stage::EXITED`].
pub mod stage {
    pub const SPAWNED: u8 = 0;
    /// Connected, handshaken and joined.
    pub const READY: u8 = 1;
    /// Sending stopped and every request answered (or count reached).
    pub const QUIET: u8 = 2;
    /// Has seen the last change of its session or document.
    pub const DRAINED: u8 = 3;
    /// The task ended, however it ended: it holds up no wait.
    pub const EXITED: u8 = u8::MAX;
}

/// How a bounded wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Reached,
    TimedOut,
    Interrupted,
}

/// Why the measured phase ended, as the report says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Count,
    Interrupted,
    /// Every client's connection ended before the bound: the target closed or lost them all.
    Dropped,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duration => "duration",
            Self::Count => "count",
            Self::Interrupted => "ctrl-c",
            Self::Dropped => "dropped",
        }
    }
}

/// How often a wait looks at the stages: cheap (a scan of atomics), and fine-grained enough for
/// the drain not to add visible time to a run.
const POLL: Duration = Duration::from_millis(20);

/// The run's side of the timeline.
pub struct Conductor {
    phase: watch::Sender<Phase>,
    stages: Arc<[AtomicU8]>,
    interrupts: watch::Receiver<u32>,
    /// Ctrl-C presses already acted on.
    seen_interrupts: u32,
    ctrl_c: tokio::task::JoinHandle<()>,
}

/// A client's side of the timeline.
pub struct Cue {
    index: usize,
    stages: Arc<[AtomicU8]>,
    phase: watch::Receiver<Phase>,
}

impl Conductor {
    /// A timeline for `clients` client tasks, listening for Ctrl-C.
    pub fn new(clients: usize) -> Self {
        let (phase, _) = watch::channel(Phase::Ramp);
        let stages: Arc<[AtomicU8]> = (0..clients)
            .map(|_| AtomicU8::new(stage::SPAWNED))
            .collect();
        let (tx, interrupts) = watch::channel(0u32);
        let presses = Arc::new(AtomicU32::new(0));
        let ctrl_c = tokio::spawn(async move {
            // If the handler cannot be installed, the run still ends by its own bounds.
            while tokio::signal::ctrl_c().await.is_ok() {
                let n = presses.fetch_add(1, Ordering::Relaxed) + 1;
                if tx.send(n).is_err() {
                    break;
                }
            }
        });
        Self {
            phase,
            stages,
            interrupts,
            seen_interrupts: 0,
            ctrl_c,
        }
    }

    pub fn cue(&self, index: usize) -> Cue {
        Cue {
            index,
            stages: self.stages.clone(),
            phase: self.phase.subscribe(),
        }
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Clients in `range` that reached `stage` (or ended).
    pub fn count_at(&self, range: Range<usize>, at: u8) -> usize {
        self.stages[range]
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) >= at)
            .count()
    }

    /// Waits until every client in `range` reached `stage`, for at most `limit`, or until a new
    /// Ctrl-C.
    pub async fn wait_for(&mut self, range: Range<usize>, at: u8, limit: Duration) -> Waited {
        let deadline = Instant::now() + limit;
        let len = range.len();
        loop {
            if self.count_at(range.clone(), at) == len {
                return Waited::Reached;
            }
            if Instant::now() >= deadline {
                return Waited::TimedOut;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.interrupts.changed() => {}
            }
            if self.take_interrupt() {
                return Waited::Interrupted;
            }
        }
    }

    pub async fn wait_all(&mut self, at: u8, limit: Duration) -> Waited {
        self.wait_for(0..self.stages.len(), at, limit).await
    }

    /// The measured phase: `limit`, or until every client in `done` reached QUIET by itself
    /// (count-bound runs), or Ctrl-C. A client task ends before `Close` only when its
    /// connection does, so once every client of one of the `essential` groups has ended the run
    /// cannot go on: it stops as [`StopReason::Dropped`] instead of waiting out the bound on a
    /// dead target.
    pub async fn measure(
        &mut self,
        limit: Duration,
        done: Option<Range<usize>>,
        essential: &[Range<usize>],
    ) -> StopReason {
        let deadline = Instant::now() + limit;
        loop {
            if essential
                .iter()
                .any(|group| self.count_at(group.clone(), stage::EXITED) == group.len())
            {
                return StopReason::Dropped;
            }
            if let Some(range) = &done
                && self.count_at(range.clone(), stage::QUIET) == range.len()
            {
                return StopReason::Count;
            }
            if Instant::now() >= deadline {
                return StopReason::Duration;
            }
            let nap = POLL.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = self.interrupts.changed() => {}
            }
            if self.take_interrupt() {
                return StopReason::Interrupted;
            }
        }
    }

    /// True when a Ctrl-C came since the last call.
    pub fn take_interrupt(&mut self) -> bool {
        let now = *self.interrupts.borrow();
        let new = now > self.seen_interrupts;
        self.seen_interrupts = now;
        new
    }
}

/// The one essential group of a run whose clients are all alike: every client.
#[expect(
    clippy::single_range_in_vec_init,
    reason = "a list of one group of clients, not a list of client indexes"
)]
pub fn everyone(total: usize) -> Vec<Range<usize>> {
    vec![0..total]
}

/// How a scenario wants its timeline run by [`Conductor::run`].
pub struct Plan<'a> {
    pub progress: &'a Progress,
    pub live: &'a Live,
    /// The longest measured phase.
    pub bound: Duration,
    /// Count-bound runs: the clients whose QUIET ends the measured phase early.
    pub done: Option<Range<usize>>,
    /// Groups of clients the run cannot go on without (every client, or the workers and the
    /// submitters apart): once all of one group have ended, the run stops as dropped.
    pub essential: Vec<Range<usize>>,
    /// What the progress bar follows while measuring: a count of `len`, or time when `None`.
    pub run_track: Option<(u64, Track)>,
    /// The clients that must be QUIET before the drain (the rest are only told to stop).
    pub quiet: Range<usize>,
    /// The longest wait for QUIET, and again for DRAINED.
    pub drain: Duration,
    /// Whether there is a drain phase at all (workers and idle sockets have none).
    pub drain_phase: bool,
    /// Set to `now_us()` as the measured phase begins: older timestamps are not latencies.
    pub run_start_us: &'a AtomicU64,
    /// The server's pid (`--pid`), whose CPU use is measured beside the load generator's.
    pub server_pid: Option<u32>,
}

/// How the timeline went.
pub struct Timeline {
    pub stopped_by: StopReason,
    /// The measured phase, which rates are divided by.
    pub elapsed: Duration,
    /// Waits that ran out, for the report.
    pub notes: Vec<String>,
    /// CPU use over the measured phase (`None`: the run stopped before it).
    pub cpu: Option<CpuUse>,
}

impl Conductor {
    /// The ramp: waits until every client is READY (or has failed), for at most `limit`.
    pub async fn ramp(&mut self, limit: Duration) -> Waited {
        self.wait_all(stage::READY, limit).await
    }

    /// After [`Self::ramp`] said `ready`: Run → Stop → (Drain) → Close, every wait bounded.
    /// Returns once every client has been told to close; collecting their results is the
    /// caller's.
    pub async fn run(&mut self, plan: Plan<'_>, ready: Waited) -> Timeline {
        let mut notes = Vec::new();
        if ready == Waited::TimedOut {
            notes.push("some clients were still connecting when the measured phase began".into());
        }
        let mut elapsed = Duration::ZERO;
        let mut cpu = None;
        let stopped_by =
            if plan.live.connected.load(Ordering::Relaxed) == 0 || ready == Waited::Interrupted {
                StopReason::Interrupted
            } else {
                plan.run_start_us.store(now_us(), Ordering::Relaxed);
                self.set(Phase::Run);
                let started = Instant::now();
                let cpu_start = CpuSample::take(plan.server_pid);
                match plan.run_track {
                    Some((len, track)) => plan.progress.stage("run", len, track),
                    None => plan.progress.stage(
                        "run",
                        u64::try_from(plan.bound.as_millis()).unwrap_or(u64::MAX),
                        Track::Elapsed(started),
                    ),
                }
                let reason = self.measure(plan.bound, plan.done, &plan.essential).await;
                elapsed = started.elapsed();
                cpu = Some(CpuSample::take(plan.server_pid).since(&cpu_start));
                if reason == StopReason::Dropped {
                    notes.push(format!(
                        "the target ended the connections the run needs {:.1} s into the \
                         measured phase; the run stopped there",
                        elapsed.as_secs_f64()
                    ));
                }
                reason
            };
        self.set(Phase::Stop);
        plan.progress.stage("drain", 1, Track::Sent);
        if self.wait_for(plan.quiet, stage::QUIET, plan.drain).await == Waited::TimedOut {
            notes.push("some requests were still unanswered when the drain ended".into());
        }
        if plan.drain_phase {
            self.set(Phase::Drain);
            if self.wait_all(stage::DRAINED, plan.drain).await == Waited::TimedOut {
                notes.push("some clients had not seen the last change when the drain ended".into());
            }
        }
        self.set(Phase::Close);
        Timeline {
            stopped_by,
            elapsed,
            notes,
            cpu,
        }
    }
}

/// What a client task returns, as far as the end of the run needs to see it.
pub trait Outcome {
    /// The stand-in for a task that had to be aborted.
    fn lost() -> Self;
    fn connected(&self) -> bool;
    fn errors(&self) -> &Errors;
    /// Whether the connection ended before the run told it to close.
    fn dropped(&self) -> bool;
}

/// Implements [`Outcome`] for a result struct with `connected: bool`, `errors: Errors` and
/// `dropped: Option<String>` (why the connection ended early) fields and a `Default` (which, with `client_task_lost` counted, is its `lost()`).
macro_rules! outcome {
    ($t:ty) => {
        impl $crate::load::conduct::Outcome for $t {
            fn lost() -> Self {
                let mut lost = Self::default();
                lost.errors.add("client_task_lost");
                lost
            }

            fn connected(&self) -> bool {
                self.connected
            }

            fn errors(&self) -> &$crate::load::stats::Errors {
                &self.errors
            }

            fn dropped(&self) -> bool {
                self.dropped.is_some()
            }
        }
    };
}
pub(crate) use outcome;

/// The longest the ramp may take: the ramp itself, one connection timeout, and a second.
pub fn ramp_limit(common: &CommonArgs) -> Duration {
    common.ramp_up + common.timeout + Duration::from_secs(1)
}

/// How long to wait for client tasks to end once told to close.
pub fn close_limit(common: &CommonArgs) -> Duration {
    common.timeout + Duration::from_secs(5)
}

/// A run in which every client sends (`native`, `yjs`).
pub struct Senders<'a> {
    pub common: &'a CommonArgs,
    pub live: &'a Arc<Live>,
    pub total: usize,
    pub duration: Option<Duration>,
    /// Messages per client, if count-bound.
    pub count: Option<u64>,
    pub run_start_us: &'a AtomicU64,
}

/// The whole timeline of a [`Senders`] run: `spawn(index, ramp delay, cue)` starts each client;
/// then ramp, measure, stop, drain, close and collect.
pub async fn run_senders<T: Outcome + Send + 'static>(
    run: Senders<'_>,
    mut spawn: impl FnMut(usize, Duration, Cue) -> JoinHandle<T>,
) -> Result<(Timeline, Vec<T>), LoadError> {
    let Senders {
        common,
        live,
        total,
        duration,
        count,
        run_start_us,
    } = run;
    let mut conductor = Conductor::new(total);
    let progress = Progress::start(common.json, live.clone());
    progress.stage("connect", total as u64, Track::Connections);
    let handles: Vec<_> = (0..total)
        .map(|i| spawn(i, ramp_delay(i, total, common.ramp_up), conductor.cue(i)))
        .collect();
    let ready = conductor.ramp(ramp_limit(common)).await;
    let plan = Plan {
        progress: &progress,
        live,
        bound: measured_bound(duration, count),
        done: count.map(|_| 0..total),
        essential: everyone(total),
        run_track: count.map(|c| (c.saturating_mul(total as u64), Track::Sent)),
        quiet: 0..total,
        drain: common.drain,
        drain_phase: true,
        run_start_us,
        server_pid: common.pid,
    };
    let timeline = conductor.run(plan, ready).await;
    let results = gather(handles, close_limit(common), progress).await?;
    Ok((timeline, results))
}

/// Joins client tasks, all within `limit`: a task still running then is aborted and stands
/// as [`Outcome::lost`] in the results.
pub async fn collect<T: Outcome>(handles: Vec<JoinHandle<T>>, limit: Duration) -> Vec<T> {
    let deadline = Instant::now() + limit;
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(_)) | Err(_) => {
                abort.abort();
                results.push(T::lost());
            }
        }
    }
    results
}

/// The end of every run: collects the clients (bounded), clears the progress bar, and refuses
/// a run in which no client ever connected (its report would only say "0").
pub async fn gather<T: Outcome>(
    handles: Vec<JoinHandle<T>>,
    limit: Duration,
    progress: Progress,
) -> Result<Vec<T>, LoadError> {
    let results = collect(handles, limit).await;
    progress.finish();
    if results.iter().any(T::connected) {
        return Ok(results);
    }
    Err(LoadError::NothingConnected {
        attempted: results.len(),
        first: first_failure(&results),
    })
}

/// The first error sample among `results`, for a one-line error.
pub fn first_failure<T: Outcome>(results: &[T]) -> String {
    results
        .iter()
        .find_map(|r| r.errors().first_sample())
        .unwrap_or_else(|| "interrupted before connecting".into())
}

/// Connections attempted, opened and failed, from the clients' outcomes.
pub fn connections<T: Outcome>(results: &[T]) -> Connections {
    let opened = results.iter().filter(|r| r.connected()).count() as u64;
    Connections {
        attempted: results.len() as u64,
        opened,
        failed: results.len() as u64 - opened,
        dropped: results.iter().filter(|r| r.dropped()).count() as u64,
    }
}

/// How far behind its schedule a sender may fall and still catch up. A client's task is often a
/// few milliseconds late when a hundred share two cores, and at R = 400 that is a tick or two:
/// skipped, they cost a fifth of the offered rate, so late ticks are sent. Ticks missed for
/// longer than this (a stalled client, a paused process) are dropped rather than sent in one
/// burst, and the report's "sent per s" shows the rate actually offered.
const MAX_CATCH_UP: Duration = Duration::from_millis(50);

/// A send ticker at `period`, starting at a random point in the first period so that clients
/// do not send in lockstep. Read it with [`tick`], which bounds the catching up.
pub fn ticker_for(period: Duration) -> Interval {
    let offset = period.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(Instant::now() + offset, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    ticker
}

/// The next tick, or never when there is no ticker yet. A tick more than [`MAX_CATCH_UP`] late
/// still fires, but the ticks missed behind it are dropped.
pub async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            let due = t.tick().await;
            if due.elapsed() > MAX_CATCH_UP {
                t.reset();
            }
        }
        None => std::future::pending().await,
    }
}

impl Drop for Conductor {
    fn drop(&mut self) {
        self.ctrl_c.abort();
    }
}

impl Cue {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The next phase. If the conductor is gone, the run is over: `Close`.
    pub async fn changed(&mut self) -> Phase {
        if self.phase.changed().await.is_err() {
            return Phase::Close;
        }
        *self.phase.borrow_and_update()
    }

    /// Sleeps `delay` unless the run moves past `Ramp` first; false if it did.
    pub async fn ramp_sleep(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.phase() != Phase::Ramp {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return self.phase() == Phase::Ramp,
                _ = self.changed() => {}
            }
        }
    }

    pub fn reach(&self, at: u8) {
        self.stages[self.index].fetch_max(at, Ordering::Relaxed);
    }

    pub fn reached(&self, at: u8) -> bool {
        self.stages[self.index].load(Ordering::Relaxed) >= at
    }
}

impl Drop for Cue {
    fn drop(&mut self) {
        self.stages[self.index].store(stage::EXITED, Ordering::Relaxed);
    }
}

/// When client `index` of `total` opens its connection: evenly over `ramp`, the first at once.
pub fn ramp_delay(index: usize, total: usize, ramp: Duration) -> Duration {
    if total == 0 {
        return Duration::ZERO;
    }
    ramp.mul_f64(index as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_is_even_and_starts_at_once() {
        let ramp = Duration::from_secs(5);
        assert_eq!(ramp_delay(0, 10, ramp), Duration::ZERO);
        assert_eq!(ramp_delay(5, 10, ramp), Duration::from_millis(2500));
        assert!(ramp_delay(9, 10, ramp) < ramp);
        assert_eq!(ramp_delay(3, 10, Duration::ZERO), Duration::ZERO);
        assert_eq!(ramp_delay(0, 0, ramp), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn late_ticks_catch_up_but_a_stall_is_not_sent_in_a_burst() {
        let period = Duration::from_millis(10);
        let mut ticker = Some(ticker_for(period));
        tick(&mut ticker).await;
        // 35 ms late: the three ticks owed fire at once, and the next keeps the schedule.
        tokio::time::advance(Duration::from_millis(35)).await;
        let late = Instant::now();
        for _ in 0..3 {
            tick(&mut ticker).await;
        }
        assert_eq!(Instant::now(), late, "owed ticks waited");
        tick(&mut ticker).await;
        assert!(Instant::now() - late <= Duration::from_millis(5));
        // Stalled for 200 ms: one tick fires, the other nineteen are dropped.
        tokio::time::advance(Duration::from_millis(200)).await;
        tick(&mut ticker).await;
        let resumed = Instant::now();
        tick(&mut ticker).await;
        assert_eq!(
            Instant::now() - resumed,
            period,
            "a stall was sent in a burst"
        );
    }

    #[tokio::test]
    async fn exited_clients_hold_up_no_wait() {
        let mut c = Conductor::new(3);
        let a = c.cue(0);
        let b = c.cue(1);
        let gone = c.cue(2);
        a.reach(stage::READY);
        b.reach(stage::DRAINED);
        drop(gone);
        assert_eq!(
            c.wait_all(stage::READY, Duration::from_secs(1)).await,
            Waited::Reached
        );
        assert_eq!(
            c.wait_all(stage::QUIET, Duration::from_millis(50)).await,
            Waited::TimedOut
        );
        assert_eq!(c.count_at(0..3, stage::QUIET), 2);
        assert_eq!(
            c.measure(Duration::from_millis(30), None, &everyone(3))
                .await,
            StopReason::Duration
        );
        assert_eq!(
            c.measure(Duration::from_secs(5), Some(1..3), &everyone(3))
                .await,
            StopReason::Count
        );
        // The run cannot go on once a group it needs is gone, even with others still there.
        assert_eq!(
            c.measure(Duration::from_secs(5), Some(0..2), &[0..2, 2..3])
                .await,
            StopReason::Dropped
        );
        drop((a, b));
        assert_eq!(
            c.measure(Duration::from_secs(5), None, &everyone(3)).await,
            StopReason::Dropped
        );
    }

    #[tokio::test]
    async fn cues_follow_the_phase() {
        let c = Conductor::new(1);
        let mut cue = c.cue(0);
        assert_eq!(cue.phase(), Phase::Ramp);
        c.set(Phase::Run);
        assert_eq!(cue.changed().await, Phase::Run);
        assert!(!cue.ramp_sleep(Duration::from_secs(10)).await);
        drop(c);
        assert_eq!(cue.changed().await, Phase::Close);
    }
}
