//! The limiter on password attempts: token buckets per source (an IPv4 address or an IPv6 /64)
//! and globally.
//!
//! Kind: pure (time is an input).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::limits::{TokenBucket, source_key};

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

/// Password attempts, per source and globally (token buckets). Each attempt spends a token when
/// it starts, a successful one gets it back ([`AttemptLimiter::refund`]).
///
/// A source is an IPv4 address or an IPv6 /64 (so an attacker cannot rotate through its own
/// prefix). One source that keeps guessing only exhausts its own bucket: the global one drains
/// only when many sources fail, and refills within seconds.
#[derive(Debug)]
pub struct AttemptLimiter {
    cfg: LimiterConfig,
    sources: HashMap<IpAddr, TokenBucket>,
    global: TokenBucket,
}

/// Whether an attempt may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Too many failures; retry after this long.
    RetryAfter(Duration),
}

impl AttemptLimiter {
    /// A limiter starting full at `now`.
    pub fn new(cfg: LimiterConfig, now: Instant) -> Self {
        Self {
            sources: HashMap::new(),
            global: TokenBucket::new(cfg.global_burst, cfg.global_rate, now),
            cfg,
        }
    }

    /// Whether `source` may try a password now.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Verdict {
        let mut wait = self.global.wait(now);
        if let Some(b) = self.sources.get_mut(&source_key(source)) {
            wait = wait.max(b.wait(now));
        }
        if wait.is_zero() {
            Verdict::Allowed
        } else {
            Verdict::RetryAfter(wait)
        }
    }

    /// Spends a token of `source` and of the global bucket (an attempt started, or failed).
    pub fn failed(&mut self, source: IpAddr, now: Instant) {
        self.global.spend(now);
        let key = source_key(source);
        if self.sources.len() >= self.cfg.max_sources && !self.sources.contains_key(&key) {
            // Forget buckets that refilled (they equal a fresh source), else the fullest one.
            self.sources.retain(|_, b| !b.is_full(now));
            if self.sources.len() >= self.cfg.max_sources
                && let Some(k) = self
                    .sources
                    .iter_mut()
                    .map(|(k, b)| (*k, b.tokens(now)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _)| k)
            {
                self.sources.remove(&k);
            }
        }
        let (burst, rate) = (self.cfg.per_source_burst, self.cfg.per_source_rate);
        self.sources
            .entry(key)
            .or_insert_with(|| TokenBucket::new(burst, rate, now))
            .spend(now);
    }

    /// Gives back the token an attempt of `source` spent (it succeeded, or it did not test a
    /// password after all).
    pub fn refund(&mut self, source: IpAddr, now: Instant) {
        self.global.refund(now);
        if let Some(b) = self.sources.get_mut(&source_key(source)) {
            b.refund(now);
        }
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
        l.failed(IpAddr::from([1, 1, 1, 1]), t0);
        l.refund(IpAddr::from([1, 1, 1, 1]), t0);
        assert_eq!(l.check(IpAddr::from([1, 1, 1, 1]), t0), Verdict::Allowed);
        for i in 0..10_000u32 {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
            assert!(l.sources.len() <= 100);
        }
    }
}
