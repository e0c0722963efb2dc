//! Exponential backoff with full jitter, for the reconnect loops.
//!
//! A dozen explicit lines rather than a crate: `backoff` is unmaintained, and
//! `backon`'s jitter adds a random amount on top of the exponential delay
//! instead of drawing the whole delay at random ("full jitter"), which is what
//! spreads a herd of clients reconnecting to a restarted node best. Our loops
//! also reset the attempt count on their own terms (after the server answered),
//! which fits a plain "delay for attempt n" function better than a retry
//! combinator.

use std::time::Duration;

/// How long to wait between reconnect attempts.
///
/// Attempt `n` (counting from 1) waits a uniformly random time between zero and
/// `min(max, initial * factor^(n-1))` ("full jitter"), so clients that lost the
/// same node spread out instead of reconnecting in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first attempt's delay. Default: 100 ms.
    pub initial: Duration,
    /// The ceiling no delay exceeds, however many attempts failed. Default: 10 s.
    pub max: Duration,
    /// How much the ceiling grows with each failed attempt; at least 1.
    /// Default: 2.
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// The largest delay attempt `attempt` (counting from 1) may wait.
    /// Attempt 0 means "no failure yet" and waits nothing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        // Past ~64 doublings the product is astronomically larger than any sane
        // `max` anyway; capping the exponent keeps the float finite.
        let exponent = (attempt - 1).min(64) as i32;
        let grown = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exponent);
        // `f64::min` ignores a NaN operand, and `try_from_secs_f64` refuses
        // negatives and infinities, so a strange config degrades to `max`
        // rather than panicking.
        Duration::try_from_secs_f64(grown.min(self.max.as_secs_f64()))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A random delay for attempt `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(rand::random::<f64>())
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.factor.is_finite() || self.factor < 1.0 {
            return Err(format!(
                "backoff factor must be a finite number >= 1, got {}",
                self.factor
            ));
        }
        if self.initial > self.max {
            return Err("backoff initial delay exceeds its max".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_from_100ms_and_stops_at_10s() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), Duration::ZERO);
        assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(2), Duration::from_millis(200));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(400));
        assert_eq!(backoff.ceiling(7), Duration::from_millis(6400));
        assert_eq!(backoff.ceiling(8), Duration::from_secs(10));
        assert_eq!(backoff.ceiling(1000), Duration::from_secs(10));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn every_delay_lies_between_zero_and_its_ceiling() {
        let backoff = Backoff::default();
        for attempt in 0..40 {
            for _ in 0..200 {
                let delay = backoff.delay(attempt);
                assert!(
                    delay <= backoff.ceiling(attempt),
                    "attempt {attempt}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn delays_are_spread_out_not_constant() {
        let backoff = Backoff::default();
        let samples: Vec<_> = (0..100).map(|_| backoff.delay(10)).collect();
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        // 100 uniform draws from [0, 10 s] spanning less than 5 s is
        // vanishingly unlikely (about 100 * 0.5^99).
        assert!(max - min > Duration::from_secs(5), "{min:?}..{max:?}");
    }

    #[test]
    fn odd_configs_degrade_to_the_max_without_panicking() {
        let nan = Backoff {
            factor: f64::NAN,
            ..Backoff::default()
        };
        assert!(nan.ceiling(5) <= nan.max);
        let huge = Backoff {
            factor: 1e300,
            ..Backoff::default()
        };
        assert_eq!(huge.ceiling(10), huge.max);
        assert!(nan.validate().is_err());
        assert!(
            Backoff {
                factor: 0.5,
                ..Backoff::default()
            }
            .validate()
            .is_err()
        );
        assert!(Backoff::default().validate().is_ok());
    }
}
