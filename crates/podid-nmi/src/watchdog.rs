//! Closing connections that sit idle or never finish a request head.
//!
//! hyper's own `header_read_timeout` arms a fresh timer for every request head: a boxed sleep,
//! registered in the timer wheel and removed again on every request, a measurable share of a
//! cached token answer. This watchdog costs a request two counter increments instead, and one
//! timer per connection that wakes twice per deadline.
//!
//! A connection is closed when no request has started or finished on it for one deadline and
//! none is in flight: an idle keep-alive connection, or a client that sends part of a request
//! head and stalls (the service is only called once the head is complete). It is checked every
//! half deadline, so the connection goes between one and one and a half deadlines after its
//! last request. A request that takes longer (a token fetch, a wait for an assignment) is never
//! cut: its answer is bounded by its own timeouts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::Service;

/// Per-connection request counter: bumped when a request starts and when its answer is ready
/// (or dropped), so it is even exactly when no request is in flight.
#[derive(Debug, Default)]
pub(crate) struct Activity(AtomicU64);

impl Activity {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A service that records each request's start and end in an [`Activity`].
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S, R> Service<R> for Watched<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WatchedFuture<S::Future>;

    fn call(&self, request: R) -> Self::Future {
        self.activity.bump();
        WatchedFuture {
            inner: self.inner.call(request),
            _end: End(Arc::clone(&self.activity)),
        }
    }
}

/// Bumps the counter once more when the request's future completes or is dropped.
#[derive(Debug)]
struct End(Arc<Activity>);

impl Drop for End {
    fn drop(&mut self) {
        self.0.bump();
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Watched`] service's request.
    #[derive(Debug)]
    pub(crate) struct WatchedFuture<F> {
        #[pin]
        inner: F,
        _end: End,
    }
}

impl<F: Future> Future for WatchedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // hyper drops the future right after it completes, which ends the request.
        self.project().inner.poll(cx)
    }
}

/// Completes once the connection of `activity` has had no request start or finish for
/// `deadline` with none in flight (see the module documentation).
pub(crate) async fn stalled(activity: &Activity, deadline: Duration) {
    let period = (deadline / 2).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = activity.load();
    let mut quiet = 0;
    loop {
        ticks.tick().await;
        let now = activity.load();
        if now == last && now.is_multiple_of(2) {
            quiet += 1;
            if quiet >= 2 {
                return;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_stalled_after_one_to_one_and_a_half_deadlines() {
        let activity = Activity::default();
        let start = tokio::time::Instant::now();
        stalled(&activity, Duration::from_secs(10)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_secs(15),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut() {
        let activity = Activity::default();
        activity.bump(); // started, not finished
        let watch = stalled(&activity, Duration::from_secs(10));
        let outcome = tokio::time::timeout(Duration::from_secs(600), watch).await;
        assert!(
            outcome.is_err(),
            "a connection with a request in flight was closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_restarts_the_deadline() {
        let activity = Arc::new(Activity::default());
        let start = tokio::time::Instant::now();
        let requests = {
            let activity = Arc::clone(&activity);
            async move {
                // A request every 4 s for 40 s, each taking 1 s.
                for _ in 0..10 {
                    activity.bump();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    activity.bump();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stalled(&activity, Duration::from_secs(10)) => {}
            () = requests => unreachable!(),
        }
        let waited = start.elapsed();
        // The last request ended at 37 s.
        assert!(
            waited >= Duration::from_secs(47) && waited <= Duration::from_secs(52),
            "{waited:?}"
        );
    }
}
