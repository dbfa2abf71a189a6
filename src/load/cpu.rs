//! CPU use over the measured phase: the load generator's own and, given `--pid`, the server's.
//!
//! Load and server share the machine when the target is on loopback, so a latency means little
//! without knowing how busy the cores were: at 95% busy it is queueing, whatever the server
//! does. Both figures are process CPU time (user + system, every thread) from `/proc/PID/stat`,
//! divided by the phase's wall time, so 1.0 is one core kept busy. Where `/proc` cannot be read
//! (another OS, a pid that ended) the figure is absent, never guessed.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Process CPU times at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    generator: Option<Duration>,
    server: Option<Duration>,
    server_pid: Option<u32>,
}

/// Cores kept busy over a phase (1.0 = one core).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuUse {
    pub load_generator_cores: Option<f64>,
    pub server_cores: Option<f64>,
    pub server_pid: Option<u32>,
}

impl CpuSample {
    /// This process's CPU time, and the server's when its pid is known.
    pub fn take(server_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            generator: process_cpu("self"),
            server: server_pid.and_then(|pid| process_cpu(&pid.to_string())),
            server_pid,
        }
    }

    /// The cores used between `start` and this sample.
    pub fn since(&self, start: &CpuSample) -> CpuUse {
        let wall = self.at.duration_since(start.at).as_secs_f64();
        let cores = |end: Option<Duration>, begin: Option<Duration>| match (end, begin) {
            (Some(end), Some(begin)) if wall > 0.0 => {
                Some((end.saturating_sub(begin).as_secs_f64() / wall * 1000.0).round() / 1000.0)
            }
            _ => None,
        };
        CpuUse {
            load_generator_cores: cores(self.generator, start.generator),
            server_cores: cores(self.server, start.server),
            server_pid: self.server_pid,
        }
    }
}

/// Whether the CPU time of process `pid` can be read (it exists, on this machine).
pub fn readable(pid: u32) -> bool {
    process_cpu(&pid.to_string()).is_some()
}

/// User plus system time of every thread of process `pid` (`self` for this one).
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_ticks(&stat)?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second()?,
    ))
}

/// `utime + stime` from a `/proc/PID/stat` line, in clock ticks. The command name (field 2) is
/// in parentheses and may hold spaces and parentheses itself, so fields are counted from the
/// last `)`: the state is field 3, utime 14 and stime 15.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> Option<f64> {
    // SAFETY: sysconf(3) reads a configuration value and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_counted_after_the_last_parenthesis() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(stat_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_ticks("4242 (short) S 1 2"), None);
        assert_eq!(stat_ticks("no parenthesis at all"), None);
    }

    /// Cores used by this process over `phase`, read as the generator's and as a pid's.
    fn cores_over(phase: impl FnOnce()) -> (f64, f64) {
        let start = CpuSample::take(Some(std::process::id()));
        phase();
        let used = CpuSample::take(Some(std::process::id())).since(&start);
        (
            used.load_generator_cores
                .expect("this process's CPU is readable"),
            used.server_cores.expect("a pid's CPU is readable"),
        )
    }

    #[test]
    fn a_busy_loop_shows_as_cores_used_and_a_missing_pid_as_unknown() {
        let busy = cores_over(|| {
            let until = Instant::now() + Duration::from_millis(300);
            let mut spin = 0u64;
            while Instant::now() < until {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        });
        // Other tests share the cores, so the loop may get well under one; it gets some.
        assert!(busy.0 > 0.05 && busy.1 > 0.05, "busy: {busy:?}");
        let gone = CpuSample::take(Some(u32::MAX));
        assert_eq!(
            CpuSample::take(Some(u32::MAX)).since(&gone).server_cores,
            None
        );
    }
}
