//! Retry policy: which failures are retried and after how long.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::{Failure, FailureKind};
use crate::spec::JobSpec;

/// Exponential backoff with jitter, and the classification of failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (default 1 s).
    pub base: Duration,
    /// Largest delay (default 32 s).
    pub cap: Duration,
    /// Jitter as a fraction of the delay, ±(default 0.25).
    pub jitter: f64,
    /// Whether a timed-out attempt is retried (default false).
    pub retry_on_timeout: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(32),
            jitter: 0.25,
            retry_on_timeout: false,
        }
    }
}

impl RetryPolicy {
    /// Delay before the attempt after `failed_attempt` (1-based): `base`
    /// doubled per attempt, capped, then scaled by `1 ± jitter` using
    /// `unit_random` in `[0, 1)`.
    pub fn backoff(&self, failed_attempt: u32, unit_random: f64) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let unit = if unit_random.is_finite() {
            unit_random.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * unit - 1.0);
        raw.mul_f64(factor.max(0.0))
    }

    /// Whether an attempt that failed this way may be retried (attempts
    /// left is the caller's business).
    pub fn is_retryable(&self, failure: &Failure, spec: &JobSpec) -> bool {
        match failure.kind {
            FailureKind::WorkerLost
            | FailureKind::DispatchFailed
            | FailureKind::ProvisioningFailed => true,
            FailureKind::NonZeroExit | FailureKind::Signaled | FailureKind::OomKilled => {
                spec.retry_on_failure()
            }
            FailureKind::StartFailed | FailureKind::Validation => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_and_caps() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let secs: Vec<u64> = (1..=8).map(|a| p.backoff(a, 0.5).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(3));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(5));
        let mid = p.backoff(3, 0.5);
        assert_eq!(mid, Duration::from_secs(4));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = RetryPolicy::default();
        assert!(p.backoff(u32::MAX, 0.3) <= Duration::from_secs(40));
    }
}
