//! The client-side rate limit of mic's Kubernetes requests (`--clientQps`): a token bucket of
//! `burst` tokens refilled at `qps` per second, as a tower layer around the kube client's HTTP
//! service (upstream sets client-go's `QPS = --clientQps`, `Burst = int(--clientQps)`).
//!
//! Every request takes one token when it starts (lists, gets, creates, patches, deletes,
//! events), as in client-go. Two kinds are exempt, unlike upstream, because queueing them
//! behind a backlog of throttled writes fails exactly when the leader is busiest:
//! - requests to `coordination.k8s.io` (the leader-election Lease) and to core `endpoints` (the
//!   upstream leader lock kept with `--upstream-leader-lock`; mic reads or writes no other
//!   Endpoints): a renewal that waits loses the lease;
//! - watches (`watch=true`): the watcher re-opens each watch every few minutes, and one that
//!   waits behind writes leaves the cache blind for as long as the backlog lasts (tens of
//!   minutes for a large first convergence at the default 5/s). A watch start is one cheap
//!   request per resource kind every few minutes.
//!
//! Waiting is a tokio timer, never a blocked thread, and the bucket's lock is held only to
//! take a reservation, never across an await. A token is reserved in arrival order (the
//! bucket may go into debt), so waiters start in the order they asked, `1/qps` apart.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt as _};

/// Path prefix of the requests that are never throttled (Leases).
pub(crate) const EXEMPT_PREFIX: &str = "/apis/coordination.k8s.io/";

/// The query parameter that makes a request a watch.
const WATCH: &str = "watch";

/// A token bucket: `burst` requests at once, then `qps` per second.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    qps: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Tokens left at `at`; negative when later callers have reserved future tokens.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least 1) refilled at `qps` per second (must be > 0;
    /// `--clientQps` is validated so).
    pub(crate) fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: if qps > 0.0 { qps } else { f64::MIN_POSITIVE },
            burst,
            state: Mutex::new(State {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Reserves one token and returns when it may be used (now, or later in arrival order).
    pub(crate) fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.qps).min(self.burst) - 1.0;
        state.at = now;
        if state.tokens >= 0.0 {
            return now;
        }
        let wait = Duration::try_from_secs_f64(-state.tokens / self.qps).unwrap_or(Duration::MAX);
        now.checked_add(wait)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
    }

    /// Waits for one token (a tokio timer; nothing is locked while waiting).
    pub async fn acquire(&self) {
        let at = self.reserve();
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Whether `path` is a namespaced core `endpoints` request (the upstream leader lock).
fn is_endpoints(path: &str) -> bool {
    let mut segments = path.trim_start_matches('/').split('/');
    matches!(
        (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next()
        ),
        (
            Some("api"),
            Some("v1"),
            Some("namespaces"),
            Some(_),
            Some("endpoints")
        )
    )
}

/// Whether a request to `uri` skips the bucket: a leader-lock request (Lease or upstream's
/// Endpoints) or a watch.
pub(crate) fn is_exempt(uri: &http::Uri) -> bool {
    uri.path().starts_with(EXEMPT_PREFIX)
        || is_endpoints(uri.path())
        || uri.query().is_some_and(|query| {
            query.split('&').any(|pair| {
                pair.split_once('=')
                    .is_some_and(|(key, value)| key == WATCH && matches!(value, "true" | "1"))
            })
        })
}

/// The layer: wraps a cloneable HTTP service (the kube client's stack behind a
/// `tower::buffer::Buffer`) in [`Throttle`].
#[derive(Debug, Clone)]
pub(crate) struct ThrottleLayer {
    bucket: Arc<TokenBucket>,
}

impl ThrottleLayer {
    /// Requests share `bucket`.
    pub(crate) fn new(bucket: Arc<TokenBucket>) -> Self {
        Self { bucket }
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;

    fn layer(&self, inner: S) -> Throttle<S> {
        Throttle {
            inner,
            bucket: self.bucket.clone(),
        }
    }
}

/// Takes a token from the bucket before passing a request on ([`is_exempt`] ones excepted).
#[derive(Debug, Clone)]
pub(crate) struct Throttle<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
}

impl<S, B> Service<http::Request<B>> for Throttle<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_exempt(request.uri()) {
            return Box::pin(self.inner.call(request));
        }
        // The readied `self.inner` keeps its readiness for the next call; the waiting request
        // readies a clone of its own once it has a token, so waiters hold no capacity of the
        // service behind.
        let inner = self.inner.clone();
        let bucket = self.bucket.clone();
        Box::pin(async move {
            bucket.acquire().await;
            inner.oneshot(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_at_once_then_one_per_interval() {
        let bucket = TokenBucket::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst must not wait");
        bucket.acquire().await;
        assert_eq!(start.elapsed(), ms(500), "the 4th waits 1/qps");
        bucket.acquire().await;
        assert_eq!(start.elapsed(), ms(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn refills_while_idle_but_never_beyond_burst() {
        let bucket = TokenBucket::new(5.0, 5);
        for _ in 0..5 {
            bucket.acquire().await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "a full bucket again");
        bucket.acquire().await;
        assert_eq!(start.elapsed(), ms(200), "but only `burst` tokens");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_are_spread_one_interval_apart() {
        let bucket = Arc::new(TokenBucket::new(4.0, 2));
        let start = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    bucket.acquire().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut done = Vec::new();
        for task in tasks {
            done.push(task.await.expect("no panic"));
        }
        done.sort();
        let expected: Vec<Duration> = [0, 0, 250, 500, 750, 1000, 1250, 1500, 1750, 2000]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(done, expected, "2 at once, then one every 250 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fraction_of_a_request_per_second() {
        let bucket = TokenBucket::new(0.5, 1);
        let start = Instant::now();
        bucket.acquire().await;
        bucket.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    /// When each path reached the service behind the throttle.
    type Seen = Arc<Mutex<Vec<(String, Duration)>>>;

    /// A service recording into [`Seen`] when each path reached it.
    fn recorder() -> (
        impl Service<http::Request<()>, Response = (), Error = Infallible, Future = impl Send>
        + Clone
        + Send
        + 'static,
        Seen,
    ) {
        let seen = Seen::default();
        let start = Instant::now();
        let service = {
            let seen = seen.clone();
            tower::service_fn(move |request: http::Request<()>| {
                seen.lock()
                    .expect("lock")
                    .push((request.uri().path().to_owned(), start.elapsed()));
                async { Ok::<_, Infallible>(()) }
            })
        };
        (service, seen)
    }

    fn get(path: &str) -> http::Request<()> {
        http::Request::get(path).body(()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_throttles_requests_but_not_leases_or_watches() {
        let (service, seen) = recorder();
        let bucket = Arc::new(TokenBucket::new(1.0, 1));
        let service = ThrottleLayer::new(bucket).layer(service);
        let pods = "/api/v1/pods";
        let lease = "/apis/coordination.k8s.io/v1/namespaces/default/leases/aad-pod-identity-mic";
        let first = service.clone().oneshot(get(pods));
        let second = service.clone().oneshot(get(pods));
        let third = service.clone().oneshot(get(pods));
        let writes = tokio::spawn(async move {
            first.await.expect("first");
            second.await.expect("second");
            third.await.expect("third");
        });
        // While two requests wait for tokens, a Lease request and a watch go through at once.
        tokio::task::yield_now().await;
        service.clone().oneshot(get(lease)).await.expect("lease");
        service
            .clone()
            .oneshot(get("/api/v1/nodes?&watch=true&resourceVersion=1"))
            .await
            .expect("watch");
        writes.await.expect("no panic");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 5);
        let at = |path: &str| -> Vec<Duration> {
            seen.iter()
                .filter(|(p, _)| p == path)
                .map(|(_, t)| *t)
                .collect()
        };
        assert_eq!(at(pods), vec![ms(0), ms(1000), ms(2000)]);
        assert_eq!(at(lease), vec![ms(0)], "the Lease is never throttled");
        assert_eq!(at("/api/v1/nodes"), vec![ms(0)], "nor is a watch");
    }

    #[test]
    fn only_leader_lock_requests_and_watches_are_exempt() {
        let exempt = |uri: &str| is_exempt(&uri.parse().expect("uri"));
        assert!(exempt(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/x"
        ));
        assert!(exempt(
            "/api/v1/namespaces/default/endpoints/aad-pod-identity-mic"
        ));
        assert!(exempt("/api/v1/namespaces/default/endpoints"));
        assert!(!exempt("/api/v1/endpoints"));
        assert!(!exempt("/api/v1/namespaces/endpoints/pods"));
        assert!(exempt(
            "/api/v1/pods?&watch=true&timeoutSeconds=290&resourceVersion=10"
        ));
        assert!(exempt("/api/v1/pods?watch=1"));
        assert!(!exempt("/api/v1/pods"));
        assert!(!exempt("/api/v1/pods?watch=false"));
        assert!(!exempt("/api/v1/pods?labelSelector=watch%3Dtrue"));
        assert!(!exempt("/api/v1/pods?nowatch=true"));
        assert!(!exempt(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities"
        ));
        assert!(!exempt("/apis/events.k8s.io/v1/namespaces/default/events"));
    }
}
