//! What every scenario measures: latency histograms, error tallies and the clock they share.
//!
//! Each client task keeps its own [`Latency`] and [`Errors`] (no lock on the hot path) and the
//! run merges them once at the end.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to an hour (anything longer is clamped).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Error samples kept for the report: enough to see what went wrong, never a flood.
const MAX_SAMPLES: usize = 5;

/// Unix time in microseconds, read from one monotonic clock anchored once per process.
///
/// Timestamps travel inside payloads (`{"t":…}` in chat, markers in Yjs text) and are compared
/// with the receiving client's `now_us()` in the same process, so broadcast latency is exact to
/// the microsecond and immune to wall-clock steps during the run, while still reading as Unix
/// time to anyone inspecting the messages.
pub fn now_us() -> u64 {
    static ANCHOR: LazyLock<(Instant, u64)> = LazyLock::new(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        (Instant::now(), unix)
    });
    let (at, unix) = *ANCHOR;
    unix.saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// Samples a client keeps as they are before it builds a histogram: a histogram of this range
/// and precision is ~270 KiB, and a run of 10,000 clients keeps three each, where most clients
/// record a few hundred samples.
const RAW_SAMPLES: usize = 4096;

/// Latencies in microseconds, summarised with 3 significant digits: the first few thousand
/// kept as raw samples (4 bytes each), then an hdrhistogram.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    samples: Vec<u32>,
    histogram: Option<Box<Histogram<u64>>>,
}

fn empty_histogram() -> Box<Histogram<u64>> {
    Box::new(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static bounds are valid"))
}

impl Latency {
    pub fn record_us(&mut self, us: u64) {
        let us = us.clamp(1, MAX_LATENCY_US);
        match &mut self.histogram {
            Some(histogram) => histogram.saturating_record(us),
            None => {
                // MAX_LATENCY_US fits a u32.
                self.samples.push(u32::try_from(us).unwrap_or(u32::MAX));
                if self.samples.len() >= RAW_SAMPLES {
                    self.histogram = Some(self.to_histogram());
                    self.samples = Vec::new();
                }
            }
        }
    }

    pub fn record(&mut self, elapsed: Duration) {
        self.record_us(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds another client's samples.
    pub fn merge(&mut self, other: &Latency) {
        for &us in &other.samples {
            self.record_us(u64::from(us));
        }
        if let Some(theirs) = &other.histogram {
            let mine = self.histogram.get_or_insert_with(empty_histogram);
            // Both have the same bounds, so this cannot fail; a failure would only lose
            // samples, never corrupt them.
            let _ = mine.add(theirs.as_ref());
        }
    }

    pub fn count(&self) -> u64 {
        self.samples.len() as u64 + self.histogram.as_ref().map_or(0, |h| h.len())
    }

    /// Every sample so far, in one histogram.
    fn to_histogram(&self) -> Box<Histogram<u64>> {
        let mut histogram = self.histogram.clone().unwrap_or_else(empty_histogram);
        for &us in &self.samples {
            histogram.saturating_record(u64::from(us));
        }
        histogram
    }

    pub fn summary(&self) -> Summary {
        let histogram = self.to_histogram();
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |quantile: f64| ms(histogram.value_at_quantile(quantile));
        Summary {
            count: histogram.len(),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

/// A latency distribution as reported, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Errors by code: the server's codes (`rate_limited`, `conflict`, …) as they came, and the
/// client's own (`connect`, `timeout`, `closed`, `bad_frame`, …), with the first sample of
/// each (for the first few codes).
#[derive(Debug, Clone, Default)]
pub struct Errors {
    pub counts: BTreeMap<String, u64>,
    pub samples: BTreeMap<String, String>,
}

impl Errors {
    pub fn add(&mut self, code: &str) {
        match self.counts.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                self.counts.insert(code.to_owned(), 1);
            }
        }
    }

    /// Counts `code` and keeps `detail` as its sample if it is the code's first.
    pub fn add_detail(&mut self, code: &str, detail: impl FnOnce() -> String) {
        self.add(code);
        if self.samples.len() < MAX_SAMPLES && !self.samples.contains_key(code) {
            self.samples.insert(code.to_owned(), detail());
        }
    }

    /// Any one sample, for a one-line error.
    pub fn first_sample(&self) -> Option<String> {
        self.samples
            .iter()
            .next()
            .map(|(code, detail)| format!("{code}: {detail}"))
    }

    pub fn merge(&mut self, other: &Errors) {
        for (code, n) in &other.counts {
            *self.counts.entry(code.clone()).or_default() += n;
        }
        for (code, sample) in &other.samples {
            if self.samples.len() < MAX_SAMPLES && !self.samples.contains_key(code) {
                self.samples.insert(code.clone(), sample.clone());
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// A per-second rate over `elapsed`, 0 when nothing elapsed.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// A stable 64-bit hash (FNV-1a) for comparing what clients saw without keeping it all.
/// Stable across runs and processes, unlike `DefaultHasher`, so a hash can be logged and
/// compared by hand.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_milliseconds_and_merges() {
        let mut a = Latency::default();
        for us in 1..=1000 {
            a.record_us(us * 10);
        }
        let mut b = Latency::default();
        b.record(Duration::from_millis(500));
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 1001);
        assert!((s.p50_ms - 5.0).abs() < 0.05, "{s:?}");
        assert!((s.p99_ms - 9.9).abs() < 0.05, "{s:?}");
        assert!((s.max_ms - 500.0).abs() < 0.5, "{s:?}");
    }

    #[test]
    fn raw_samples_and_the_histogram_they_spill_into_agree() {
        let mut spilled = Latency::default();
        for us in 1..=(RAW_SAMPLES as u64 * 2) {
            spilled.record_us(us);
        }
        assert!(spilled.histogram.is_some() && spilled.samples.is_empty());
        let mut raw = Latency::default();
        for us in 1..=100 {
            raw.record_us(us * 1000);
        }
        assert!(raw.histogram.is_none());
        // Raw into a histogram, and a histogram into raw, count every sample once.
        let mut a = spilled.clone();
        a.merge(&raw);
        let mut b = raw.clone();
        b.merge(&spilled);
        assert_eq!(a.count(), RAW_SAMPLES as u64 * 2 + 100);
        assert_eq!(a.summary(), b.summary());
        assert!(
            (a.summary().max_ms - 100.0).abs() < 0.1,
            "{:?}",
            a.summary()
        );
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_lost() {
        let mut l = Latency::default();
        l.record_us(0);
        l.record_us(u64::MAX);
        assert_eq!(l.count(), 2);
    }

    #[test]
    fn errors_count_by_code_and_keep_few_samples() {
        let mut e = Errors::default();
        for i in 0..10 {
            e.add_detail("rate_limited", || format!("n{i}"));
        }
        let mut other = Errors::default();
        other.add_detail("connect", || "refused".into());
        other.add_detail("rate_limited", || "later".into());
        e.merge(&other);
        assert_eq!(e.counts["rate_limited"], 11);
        assert_eq!(e.counts["connect"], 1);
        assert_eq!(e.total(), 12);
        assert_eq!(e.samples["rate_limited"], "n0");
        assert_eq!(e.samples["connect"], "refused");
        assert_eq!(e.first_sample().as_deref(), Some("connect: refused"));
        for i in 0..10 {
            e.add_detail(&format!("code{i}"), || "x".into());
        }
        assert_eq!(e.samples.len(), MAX_SAMPLES);
    }

    #[test]
    fn clock_is_unix_micros_and_monotonic() {
        let a = now_us();
        let b = now_us();
        assert!(b >= a);
        // After 2020-01-01.
        assert!(a > 1_577_836_800_000_000);
    }

    #[test]
    fn rates_and_hashes() {
        assert_eq!(per_second(10, Duration::from_secs(2)), 5.0);
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
    }
}
