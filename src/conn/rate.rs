//! A token bucket: how many frames a connection may send, on average and in a burst.

use std::time::Instant;

pub struct TokenBucket {
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(per_s: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_s: f64::from(per_s),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses_then_refills() {
        let mut bucket = TokenBucket::new(1000, 5);
        assert!((0..5).all(|_| bucket.take()));
        assert!(!bucket.take());
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(bucket.take(), "did not refill");
    }
}
