//! [`ImdsLimiter`]: the node-wide budget for calls to IMDS, which allows 5 concurrent requests
//! and 20 per second per VM. Every IMDS call of the node's NMI goes through one limiter:
//! at most `max_concurrent` in flight and at most `max_per_window` starts in any `window`.
//! Waiters queue fairly (tokio's semaphore is FIFO) and give up after `max_wait` with
//! [`LimiterTimeout`] rather than hang. A `429` from IMDS pauses all starts for its
//! `Retry-After`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Limiter tuning. The defaults are IMDS's published limits.
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Calls in flight at once (IMDS: 5).
    pub max_concurrent: usize,
    /// Calls started per window (IMDS: 20).
    pub max_per_window: usize,
    /// The rolling window (IMDS: 1 s). The default adds 50 ms so that scheduling jitter between
    /// a call's start and its arrival at IMDS cannot squeeze 21 arrivals into one second.
    pub window: Duration,
    /// Longest a caller waits for its turn before failing as unavailable.
    pub max_wait: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 5,
            max_per_window: 20,
            window: Duration::from_millis(1050),
            max_wait: Duration::from_secs(5),
        }
    }
}

/// The wait for a turn exceeded [`LimiterConfig::max_wait`] (or the limiter is paused longer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node IMDS budget exhausted: no turn within {waited:?}")]
pub struct LimiterTimeout {
    /// How long the caller waited.
    pub waited: Duration,
}

#[derive(Debug, Default)]
struct State {
    starts: VecDeque<Instant>,
    paused_until: Option<Instant>,
}

/// The node-wide IMDS budget. Share one `Arc<ImdsLimiter>` between all IMDS users.
#[derive(Debug)]
pub struct ImdsLimiter {
    config: LimiterConfig,
    semaphore: Arc<Semaphore>,
    state: Mutex<State>,
}

/// A turn: hold it for the duration of the call (it counts against the concurrency limit).
#[derive(Debug)]
pub struct ImdsPermit {
    _permit: OwnedSemaphorePermit,
}

impl ImdsLimiter {
    /// A limiter with `config` (values of zero are raised to one).
    pub fn new(config: LimiterConfig) -> Self {
        let config = LimiterConfig {
            max_concurrent: config.max_concurrent.max(1),
            max_per_window: config.max_per_window.max(1),
            ..config
        };
        Self {
            semaphore: Arc::new(Semaphore::new(config.max_concurrent)),
            state: Mutex::new(State::default()),
            config,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    /// Wait for a turn (FIFO), at most [`LimiterConfig::max_wait`].
    pub async fn acquire(&self) -> Result<ImdsPermit, LimiterTimeout> {
        let started = Instant::now();
        let timeout = LimiterTimeout {
            waited: self.config.max_wait,
        };
        let deadline = started + self.config.max_wait;
        let permit = tokio::time::timeout_at(deadline, self.semaphore.clone().acquire_owned())
            .await
            .map_err(|_| timeout)?
            .map_err(|_| timeout)?;
        loop {
            let now = Instant::now();
            let wake = {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                while state
                    .starts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.config.window)
                {
                    state.starts.pop_front();
                }
                match state.paused_until {
                    Some(until) if until > now => Some(until),
                    _ if state.starts.len() >= self.config.max_per_window => state
                        .starts
                        .front()
                        .map(|oldest| *oldest + self.config.window),
                    _ => {
                        state.paused_until = None;
                        state.starts.push_back(now);
                        None
                    }
                }
            };
            match wake {
                None => return Ok(ImdsPermit { _permit: permit }),
                Some(at) if at > deadline => return Err(timeout),
                Some(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// Start no call for `duration` (IMDS answered 429 with `Retry-After`).
    pub fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_is_bounded_per_window() {
        let limiter = ImdsLimiter::new(LimiterConfig {
            max_concurrent: 100,
            max_per_window: 3,
            window: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
        });
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..7 {
            let _permit = limiter.acquire().await.expect("turn");
            at.push(Instant::now().duration_since(start));
        }
        assert_eq!(
            at.iter().map(|d| d.as_secs()).collect::<Vec<_>>(),
            vec![0, 0, 0, 1, 1, 1, 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_give_up_after_max_wait() {
        let limiter = ImdsLimiter::new(LimiterConfig {
            max_concurrent: 1,
            max_per_window: 100,
            window: Duration::from_secs(1),
            max_wait: Duration::from_millis(200),
        });
        let held = limiter.acquire().await.expect("first");
        let error = limiter.acquire().await.expect_err("busy");
        assert_eq!(error.waited, Duration::from_millis(200));
        drop(held);
        limiter.acquire().await.expect("free again");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_delays_or_fails_starts() {
        let limiter = ImdsLimiter::new(LimiterConfig {
            max_wait: Duration::from_secs(2),
            ..LimiterConfig::default()
        });
        limiter.pause_for(Duration::from_secs(1));
        let start = Instant::now();
        limiter.acquire().await.expect("after pause");
        assert!(Instant::now().duration_since(start) >= Duration::from_secs(1));
        limiter.pause_for(Duration::from_secs(30));
        limiter.acquire().await.expect_err("paused beyond max_wait");
    }
}
