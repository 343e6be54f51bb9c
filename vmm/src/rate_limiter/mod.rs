//! Token-bucket rate limiting of device I/O, as Firecracker has it: per disk
//! and per NIC direction, one bucket of bytes per second and one of
//! operations per second. It is how the host agent gives each tenant a fair
//! share of a host's disks and network.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request. When a
//! bucket is short, the request waits in the guest's queue and the limiter
//! arms its timerfd for the moment enough tokens will have accrued; the event
//! loop watches that timerfd and lets the device carry on. Nothing polls.
//!
//! A bucket holds at most a [`BURST_FRACTION`] of a second's tokens, so the
//! average rate holds over short intervals too. A request larger than a whole
//! bucket (a 64 KiB TSO frame on a slow NIC) waits until its own size has
//! accrued and then goes: large requests cannot starve, and over any interval
//! the device moves at most the rate times the interval plus one bucket or
//! one request, whichever is larger.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// A bucket's capacity is this fraction of a second's worth of tokens.
pub const BURST_FRACTION: u64 = 10;
const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Errors of a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
}

/// The limits of one device (or one NIC direction). `None` is unlimited.
pub use nubis_contract::RateLimit;

/// One token bucket, refilled continuously at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens times 1e9, so that refills of a few nanoseconds are not lost.
    budget_nanotokens: i128,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens per second (`rate` > 0).
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        let capacity = (rate / BURST_FRACTION).max(1);
        Self {
            rate,
            capacity,
            budget_nanotokens: i128::from(capacity) * NANOS_PER_SEC,
            last_refill: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Adds the tokens accrued since the last refill, up to `limit` tokens.
    fn refill(&mut self, now: Instant, limit: u64) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        self.last_refill = now;
        let added = i128::try_from(elapsed)
            .unwrap_or(i128::MAX / 4)
            .min(i128::MAX / 4 / i128::from(self.rate))
            * i128::from(self.rate);
        let full = i128::from(limit) * NANOS_PER_SEC;
        self.budget_nanotokens = self.budget_nanotokens.saturating_add(added).min(full);
    }

    /// How long until `tokens` may be taken; zero when they may be now. A
    /// request larger than the bucket lets it fill up to its own size.
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now, tokens.max(self.capacity));
        let needed = i128::from(tokens) * NANOS_PER_SEC;
        if self.budget_nanotokens >= needed {
            return Duration::ZERO;
        }
        let missing = needed - self.budget_nanotokens;
        // Round up so that the timer never fires a nanosecond early.
        let nanos = (missing + i128::from(self.rate) - 1) / i128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn take(&mut self, tokens: u64) {
        self.budget_nanotokens -= i128::from(tokens) * NANOS_PER_SEC;
    }

    /// Takes `tokens` if the bucket allows it now; otherwise returns how
    /// long to wait and takes nothing.
    pub fn try_consume(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        match self.wait_for(tokens, now) {
            wait if wait.is_zero() => {
                self.take(tokens);
                Ok(())
            }
            wait => Err(wait),
        }
    }
}

/// A limiter's state for a snapshot: its limits, the tokens left in each
/// bucket (in nanotokens; they refill from the moment of restore), how
/// often it throttled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterState {
    pub limit: RateLimit,
    pub bytes_budget: Option<i128>,
    pub ops_budget: Option<i128>,
    pub throttled_count: u64,
}

/// The two buckets of one device (or NIC direction) and the timer that wakes
/// the device when a blocked request may go.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    throttled_count: u64,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Result<Self, RateLimiterError> {
        let timer = crate::devices::nonblocking_timer().map_err(RateLimiterError::Timer)?;
        let mut limiter = Self {
            limit: RateLimit::default(),
            bytes: None,
            ops: None,
            timer,
            blocked: false,
            throttled_count: 0,
        };
        limiter.set_limit(limit, Instant::now());
        Ok(limiter)
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Replaces the limits (full buckets). A request blocked under the old
    /// limits is retried at once.
    pub fn set_limit(&mut self, limit: RateLimit, now: Instant) {
        self.limit = limit;
        self.bytes = limit.bytes_per_s.map(|rate| TokenBucket::new(rate, now));
        self.ops = limit.ops_per_s.map(|rate| TokenBucket::new(rate, now));
        if self.blocked {
            self.arm(Duration::from_nanos(1));
        }
    }

    pub fn save(&self) -> LimiterState {
        LimiterState {
            limit: self.limit,
            bytes_budget: self.bytes.as_ref().map(|bucket| bucket.budget_nanotokens),
            ops_budget: self.ops.as_ref().map(|bucket| bucket.budget_nanotokens),
            throttled_count: self.throttled_count,
        }
    }

    /// Takes on a saved state: its limits, and its buckets' levels (never
    /// above a full bucket, whatever the file says). A request that was
    /// blocked is retried at once.
    pub fn restore(&mut self, state: &LimiterState) {
        self.set_limit(state.limit, Instant::now());
        for (bucket, budget) in [
            (self.bytes.as_mut(), state.bytes_budget),
            (self.ops.as_mut(), state.ops_budget),
        ] {
            if let (Some(bucket), Some(budget)) = (bucket, budget) {
                let full = i128::from(bucket.capacity) * NANOS_PER_SEC;
                bucket.budget_nanotokens = budget.clamp(-full, full);
            }
        }
        self.throttled_count = state.throttled_count;
    }

    /// Whether a request is waiting for the timer: the device should not
    /// serve its queue until [`RateLimiter::on_timer`].
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// How often a request had to wait.
    pub fn throttled_count(&self) -> u64 {
        self.throttled_count
    }

    /// Asks for one request of `ops` operations and `bytes` bytes. Either
    /// both buckets give their tokens or neither does; in that case the
    /// timer is armed and the limiter is blocked until it fires.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        self.consume_at(ops, bytes, Instant::now())
    }

    pub fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |bucket| bucket.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |bucket| bucket.wait_for(ops, now));
        let wait = wait_bytes.max(wait_ops);
        if !wait.is_zero() {
            self.blocked = true;
            self.throttled_count += 1;
            self.arm(wait);
            return false;
        }
        if let Some(bucket) = self.bytes.as_mut() {
            bucket.take(bytes);
        }
        if let Some(bucket) = self.ops.as_mut() {
            bucket.take(ops);
        }
        true
    }

    fn arm(&mut self, wait: Duration) {
        if let Err(err) = self.timer.reset(wait, None) {
            // Without the timer the device would wait for the next guest
            // kick: unblock now rather than risk a stall.
            log::error!("rate limiter: cannot arm the timer: {err}");
            self.blocked = false;
        }
    }

    /// The timer fired: the blocked request may be retried.
    pub fn on_timer(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer of 8 bytes from
        // a non-blocking timerfd this limiter owns; the result is ignored
        // because a spurious wake-up only retries the request.
        unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        self.blocked = false;
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_saved_limiter_comes_back_with_its_levels_clamped() {
        let limit = RateLimit {
            bytes_per_s: Some(1000),
            ops_per_s: None,
        };
        let mut limiter = RateLimiter::new(limit).unwrap();
        let now = Instant::now();
        assert!(limiter.consume_at(1, 60, now));
        let saved = limiter.save();
        assert_eq!(saved.limit, limit);
        assert_eq!(saved.bytes_budget, Some(40 * NANOS_PER_SEC));
        assert_eq!(saved.ops_budget, None);
        let mut restored = RateLimiter::new(RateLimit::default()).unwrap();
        restored.restore(&saved);
        assert_eq!(restored.save().bytes_budget, Some(40 * NANOS_PER_SEC));
        let mut forged = saved.clone();
        forged.bytes_budget = Some(i128::MAX);
        restored.restore(&forged);
        assert_eq!(restored.save().bytes_budget, Some(100 * NANOS_PER_SEC));
    }

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_gives_its_capacity_then_waits() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        assert_eq!(bucket.capacity(), 100);
        assert_eq!(bucket.try_consume(100, start), Ok(()));
        assert_eq!(bucket.try_consume(1, start), Err(MS));
        assert_eq!(bucket.try_consume(10, start), Err(10 * MS));
        assert_eq!(bucket.try_consume(10, start + 10 * MS), Ok(()));
    }

    #[test]
    fn refill_never_exceeds_capacity() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        assert_eq!(
            bucket.try_consume(100, start + Duration::from_secs(3600)),
            Ok(())
        );
        assert!(bucket
            .try_consume(1, start + Duration::from_secs(3600))
            .is_err());
    }

    #[test]
    fn oversized_requests_wait_for_their_own_size() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        // 500 tokens is five buckets: the full bucket holds 100, so the
        // request waits 400 ms for the rest, then goes.
        assert_eq!(bucket.try_consume(500, start), Err(400 * MS));
        assert_eq!(bucket.try_consume(500, start + 400 * MS), Ok(()));
        assert_eq!(bucket.try_consume(1, start + 400 * MS), Err(MS));
        // After a long idle time the bucket holds one bucket, or one
        // request when a larger one asks: never more.
        let later = start + 10_000 * MS;
        assert_eq!(bucket.try_consume(100, later), Ok(()));
        assert_eq!(bucket.try_consume(1, later), Err(MS));
        let much_later = start + 20_000 * MS;
        assert_eq!(bucket.try_consume(300, much_later), Ok(()));
        assert_eq!(bucket.try_consume(1, much_later), Err(MS));
    }

    #[test]
    fn the_average_rate_holds_over_many_requests() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10_000, start);
        let mut now = start;
        let mut sent = 0u64;
        while sent < 100_000 {
            match bucket.try_consume(4096, now) {
                Ok(()) => sent += 4096,
                Err(wait) => now += wait,
            }
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        // 100 000 tokens at 10 000/s, minus the initial burst of 1 000.
        assert!(
            (9.5..=10.6).contains(&elapsed),
            "took {elapsed} s for 10 s worth of tokens"
        );
    }

    #[test]
    fn tiny_rates_have_a_bucket_of_one() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1, start);
        assert_eq!(bucket.capacity(), 1);
        assert_eq!(bucket.try_consume(1, start), Ok(()));
        assert_eq!(bucket.try_consume(1, start), Err(Duration::from_secs(1)));
    }

    #[test]
    fn huge_rates_and_long_idle_times_do_not_overflow() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(u64::MAX, start);
        assert_eq!(bucket.try_consume(u64::MAX / 10, start), Ok(()));
        assert!(bucket.try_consume(u64::MAX, start).is_err());
        let later = start + Duration::from_secs(10 * 365 * 24 * 3600);
        assert_eq!(bucket.try_consume(u64::MAX, later), Ok(()));
    }

    #[test]
    fn both_buckets_or_neither() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(RateLimit {
            bytes_per_s: Some(1_000_000),
            ops_per_s: Some(10),
        })
        .unwrap();
        limiter.set_limit(limiter.limit(), start);
        // The ops bucket holds one op.
        assert!(limiter.consume_at(1, 1000, start));
        assert!(!limiter.consume_at(1, 1000, start));
        assert!(limiter.is_blocked());
        assert_eq!(limiter.throttled_count(), 1);
        // The bytes bucket was not charged for the refused request: after
        // the ops bucket refills, 99 000 bytes (its remainder) still pass.
        limiter.on_timer();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume_at(1, 99_000, start + Duration::from_millis(100)));
    }

    #[test]
    fn the_timer_fires_when_the_wait_is_over() {
        let mut limiter = RateLimiter::new(RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(100),
        })
        .unwrap();
        let now = Instant::now();
        limiter.set_limit(limiter.limit(), now);
        assert!(limiter.consume_at(10, 0, now));
        assert!(!limiter.consume_at(1, 0, now));
        let mut poll = libc::pollfd {
            fd: limiter.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) };
        assert_eq!(ready, 1, "the timer fires within a second (wait is 10 ms)");
        limiter.on_timer();
        assert!(limiter.consume_at(1, 0, Instant::now()));
    }

    #[test]
    fn changing_the_limit_unblocks_a_waiting_request() {
        let mut limiter = RateLimiter::new(RateLimit {
            bytes_per_s: Some(1),
            ops_per_s: None,
        })
        .unwrap();
        assert!(limiter.consume(0, 1));
        assert!(!limiter.consume(0, 1));
        limiter.set_limit(RateLimit::default(), Instant::now());
        let mut poll = libc::pollfd {
            fd: limiter.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) };
        assert_eq!(ready, 1, "the new limit wakes the device at once");
        limiter.on_timer();
        assert!(limiter.consume(1, u64::MAX), "unlimited after the change");
    }

    #[test]
    fn zero_rates_are_flagged() {
        assert!(RateLimit {
            bytes_per_s: Some(0),
            ops_per_s: None
        }
        .has_zero_rate());
        assert!(!RateLimit::default().has_zero_rate());
        assert!(RateLimit::default().is_unlimited());
    }
}
