//! The limiter on password attempts: token buckets per source (an IPv4 address or an IPv6 /64)
//! and globally.
//!
//! Kind: pure (time is an input).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, capacity: f64, per_sec: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(capacity);
        self.at = now;
    }

    fn wait(&self, per_sec: f64) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / per_sec)
        }
    }
}

/// Limits of [`AttemptLimiter`].
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Failures one source may make in a burst.
    pub per_source_burst: f64,
    /// Failures per second one source regains.
    pub per_source_rate: f64,
    /// Failures all sources together may make in a burst.
    pub global_burst: f64,
    /// Failures per second regained globally.
    pub global_rate: f64,
    /// Sources remembered at most (the map cannot be used to exhaust memory).
    pub max_sources: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            per_source_burst: 5.0,
            per_source_rate: 0.2,
            global_burst: 30.0,
            global_rate: 1.0,
            max_sources: 4096,
        }
    }
}

/// Failed password attempts, per source and globally (token buckets; only failures spend).
///
/// A source is an IPv4 address or an IPv6 /64 (so an attacker cannot rotate through its own
/// prefix). One source that keeps guessing only exhausts its own bucket: the global one drains
/// only when many sources fail, and refills within seconds.
#[derive(Debug)]
pub struct AttemptLimiter {
    cfg: LimiterConfig,
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

/// Whether an attempt may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Too many failures; retry after this long.
    RetryAfter(Duration),
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            IpAddr::V6(s.into())
        }
    }
}

impl AttemptLimiter {
    /// A limiter starting full at `now`.
    pub fn new(cfg: LimiterConfig, now: Instant) -> Self {
        Self {
            sources: HashMap::new(),
            global: Bucket {
                tokens: cfg.global_burst,
                at: now,
            },
            cfg,
        }
    }

    /// Whether `source` may try a password now.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Verdict {
        let c = self.cfg;
        self.global.refill(now, c.global_burst, c.global_rate);
        let mut wait = self.global.wait(c.global_rate);
        if let Some(b) = self.sources.get_mut(&source_key(source)) {
            b.refill(now, c.per_source_burst, c.per_source_rate);
            wait = wait.max(b.wait(c.per_source_rate));
        }
        if wait.is_zero() {
            Verdict::Allowed
        } else {
            Verdict::RetryAfter(wait)
        }
    }

    /// Spends a token of `source` and of the global bucket.
    pub fn failed(&mut self, source: IpAddr, now: Instant) {
        let c = self.cfg;
        self.global.refill(now, c.global_burst, c.global_rate);
        self.global.tokens = (self.global.tokens - 1.0).max(0.0);
        if self.sources.len() >= c.max_sources && !self.sources.contains_key(&source_key(source)) {
            // Forget buckets that refilled (they equal a fresh source), else the fullest one.
            self.sources.retain(|_, b| {
                b.refill(now, c.per_source_burst, c.per_source_rate);
                b.tokens < c.per_source_burst
            });
            if self.sources.len() >= c.max_sources
                && let Some(k) = self
                    .sources
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(k, _)| *k)
            {
                self.sources.remove(&k);
            }
        }
        let b = self.sources.entry(source_key(source)).or_insert(Bucket {
            tokens: c.per_source_burst,
            at: now,
        });
        b.refill(now, c.per_source_burst, c.per_source_rate);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_is_per_source_with_a_global_cap() {
        let t0 = Instant::now();
        let mut l = AttemptLimiter::new(LimiterConfig::default(), t0);
        let attacker: IpAddr = "203.0.113.9".parse().unwrap();
        let user: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(l.check(attacker, t0), Verdict::Allowed);
            l.failed(attacker, t0);
        }
        let Verdict::RetryAfter(wait) = l.check(attacker, t0) else {
            panic!("not limited");
        };
        assert!(
            wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        // Another source is unaffected.
        assert_eq!(l.check(user, t0), Verdict::Allowed);
        // The attacker regains one attempt after 5 s.
        assert_eq!(
            l.check(attacker, t0 + Duration::from_secs(5)),
            Verdict::Allowed
        );
        // IPv6 sources are grouped by /64.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        for _ in 0..5 {
            l.failed(a, t0);
        }
        assert!(matches!(l.check(b, t0), Verdict::RetryAfter(_)));
        // Many sources together hit the global cap, which refills within seconds.
        let mut l = AttemptLimiter::new(LimiterConfig::default(), t0);
        for i in 0..30u8 {
            l.failed(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(matches!(l.check(user, t0), Verdict::RetryAfter(_)));
        assert_eq!(l.check(user, t0 + Duration::from_secs(1)), Verdict::Allowed);
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let cfg = LimiterConfig {
            max_sources: 100,
            ..LimiterConfig::default()
        };
        let mut l = AttemptLimiter::new(cfg, t0);
        for i in 0..10_000u32 {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
            assert!(l.sources.len() <= 100);
        }
    }
}
