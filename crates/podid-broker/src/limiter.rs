//! [`ImdsLimiter`]: the node-wide budget for calls to IMDS, which allows 5 concurrent requests
//! and 20 per second per VM. Every IMDS call of the node's NMI goes through one limiter:
//! at most `max_concurrent` in flight and at most `max_per_window` starts in any `window`.
//! Waiters give up after `max_wait` with [`LimiterTimeout`] rather than hang. A `429` from IMDS
//! pauses all starts for its `Retry-After`.
//!
//! Fair share: each waiter names its [`Requester`] (the pod the call is made for). A freed turn
//! goes to the requesters in round robin, FIFO within one requester ([`FairQueue`]): a pod with
//! one call waiting is served after at most one call of each other waiting pod, never behind
//! another pod's hundred.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Who an upstream call is made for: the requesting pod (`namespace/name`), or
/// [`Requester::default`] when unknown. Shares the IMDS budget ([`ImdsLimiter`]) and the token
/// cache's room (eviction hits the requester holding the most entries first) among pods.
///
/// Set for a request with [`Requester::scope`]; the broker reads it with
/// [`Requester::current`] when it starts an upstream call or creates a cache entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Requester(Arc<str>);

tokio::task_local! {
    static REQUESTER: Requester;
}

impl Requester {
    /// The requester named `name` (nmi: `namespace/name` of the calling pod).
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The name (empty when unknown).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The requester of the task running now (set by [`Requester::scope`]), else the default.
    pub fn current() -> Self {
        REQUESTER.try_with(Clone::clone).unwrap_or_default()
    }

    /// Run `future` on behalf of this requester.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        REQUESTER.scope(self, future).await
    }
}

/// Round robin over keys, FIFO per key: the pure part of the limiter's fair share.
#[derive(Debug)]
pub struct FairQueue<K, T> {
    /// Keys with waiters, in turn order.
    rotation: VecDeque<K>,
    waiting: HashMap<K, VecDeque<T>>,
}

impl<K, T> Default for FairQueue<K, T> {
    fn default() -> Self {
        Self {
            rotation: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash, T> FairQueue<K, T> {
    /// Queue `item` for `key` (behind that key's earlier items only).
    pub fn push(&mut self, key: K, item: T) {
        let queue = self.waiting.entry(key.clone()).or_default();
        if queue.is_empty() {
            self.rotation.push_back(key);
        }
        queue.push_back(item);
    }

    /// The next item: the oldest of the key whose turn it is; that key goes to the back.
    pub fn pop(&mut self) -> Option<T> {
        let key = self.rotation.pop_front()?;
        let queue = self.waiting.get_mut(&key)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&key);
        } else {
            self.rotation.push_back(key);
        }
        item
    }

    /// Remove the first item of `key` that `matches` (a waiter that gave up); whether found.
    pub fn remove(&mut self, key: &K, matches: impl Fn(&T) -> bool) -> bool {
        let Some(queue) = self.waiting.get_mut(key) else {
            return false;
        };
        let Some(at) = queue.iter().position(matches) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.waiting.remove(key);
            self.rotation.retain(|k| k != key);
        }
        true
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.rotation.is_empty()
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// The concurrency slots and their fair queue of waiters.
#[derive(Debug, Default)]
struct Slots {
    in_flight: usize,
    next_id: u64,
    queue: FairQueue<Requester, (u64, oneshot::Sender<()>)>,
}

#[derive(Debug)]
struct Concurrency {
    max: usize,
    slots: Mutex<Slots>,
}

impl Concurrency {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give a freed slot to the next waiter in turn, or free it.
    fn release(&self) {
        let mut slots = self.lock();
        while let Some((_, waiter)) = slots.queue.pop() {
            if waiter.send(()).is_ok() {
                return;
            }
        }
        slots.in_flight = slots.in_flight.saturating_sub(1);
    }
}

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
    concurrency: Arc<Concurrency>,
    state: Mutex<State>,
}

/// A turn: hold it for the duration of the call (it counts against the concurrency limit).
#[derive(Debug)]
pub struct ImdsPermit {
    concurrency: Arc<Concurrency>,
}

impl Drop for ImdsPermit {
    fn drop(&mut self) {
        self.concurrency.release();
    }
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
            concurrency: Arc::new(Concurrency {
                max: config.max_concurrent,
                slots: Mutex::new(Slots::default()),
            }),
            state: Mutex::new(State::default()),
            config,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    /// Wait for a turn for the task's [`Requester::current`], at most
    /// [`LimiterConfig::max_wait`].
    pub async fn acquire(&self) -> Result<ImdsPermit, LimiterTimeout> {
        self.acquire_for(Requester::current()).await
    }

    /// A concurrency slot for `requester`: at once when one is free and nobody waits, else in
    /// the fair queue until `deadline`.
    async fn slot(
        &self,
        requester: Requester,
        deadline: Instant,
    ) -> Result<ImdsPermit, LimiterTimeout> {
        let timeout = LimiterTimeout {
            waited: self.config.max_wait,
        };
        let permit = || ImdsPermit {
            concurrency: Arc::clone(&self.concurrency),
        };
        let (id, mut granted) = {
            let mut slots = self.concurrency.lock();
            if slots.in_flight < self.concurrency.max && slots.queue.is_empty() {
                slots.in_flight += 1;
                return Ok(permit());
            }
            let id = slots.next_id;
            slots.next_id += 1;
            let (tx, rx) = oneshot::channel();
            slots.queue.push(requester.clone(), (id, tx));
            (id, rx)
        };
        match tokio::time::timeout_at(deadline, &mut granted).await {
            Ok(Ok(())) => Ok(permit()),
            Ok(Err(_)) | Err(_) => {
                let still_queued = self
                    .concurrency
                    .lock()
                    .queue
                    .remove(&requester, |(waiter, _)| *waiter == id);
                if !still_queued && granted.try_recv().is_ok() {
                    // Handed a slot just as time ran out: give it to the next in turn.
                    self.concurrency.release();
                }
                Err(timeout)
            }
        }
    }

    /// Wait for a turn for `requester` (round robin among requesters, FIFO within one), at most
    /// [`LimiterConfig::max_wait`].
    pub async fn acquire_for(&self, requester: Requester) -> Result<ImdsPermit, LimiterTimeout> {
        let started = Instant::now();
        let timeout = LimiterTimeout {
            waited: self.config.max_wait,
        };
        let deadline = started + self.config.max_wait;
        let permit = self.slot(requester, deadline).await?;
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
                None => return Ok(permit),
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

    #[test]
    fn fair_queue_takes_turns_between_keys() {
        let mut queue = FairQueue::default();
        for i in 0..100 {
            queue.push("noisy", i);
        }
        queue.push("quiet", 1000);
        queue.push("other", 2000);
        // The quiet key's one item comes second, not after the noisy key's hundred.
        assert_eq!(queue.pop(), Some(0));
        assert_eq!(queue.pop(), Some(1000));
        assert_eq!(queue.pop(), Some(2000));
        assert_eq!(queue.pop(), Some(1));
        assert_eq!(queue.pop(), Some(2));
        // A key coming back joins the rotation's back.
        queue.push("quiet", 1001);
        assert_eq!(queue.pop(), Some(3));
        assert_eq!(queue.pop(), Some(1001));
        assert!(queue.remove(&"noisy", |i| *i == 50));
        assert!(!queue.remove(&"noisy", |i| *i == 50));
        assert_eq!(queue.len(), 100 - 4 - 1);
        let rest: Vec<_> = std::iter::from_fn(|| queue.pop()).collect();
        assert!(!rest.contains(&50));
        assert!(queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_with_one_call_is_never_behind_another_pods_hundred() {
        let limiter = Arc::new(ImdsLimiter::new(LimiterConfig {
            max_concurrent: 1,
            max_per_window: 1000,
            window: Duration::from_secs(1),
            max_wait: Duration::from_secs(600),
        }));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = limiter
            .acquire_for(Requester::new("noisy"))
            .await
            .expect("first");
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (limiter, order) = (Arc::clone(&limiter), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _turn = limiter
                    .acquire_for(Requester::new("noisy"))
                    .await
                    .expect("turn");
                order.lock().expect("order lock").push(format!("noisy-{i}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        let quiet = {
            let (limiter, order) = (Arc::clone(&limiter), Arc::clone(&order));
            tokio::spawn(Requester::new("quiet").scope(async move {
                let _turn = limiter.acquire().await.expect("turn");
                order.lock().expect("order lock").push("quiet".to_owned());
            }))
        };
        tokio::task::yield_now().await;
        drop(held);
        quiet.await.expect("quiet");
        for task in tasks {
            task.await.expect("noisy");
        }
        let order = order.lock().expect("order lock");
        let at = order
            .iter()
            .position(|o| o == "quiet")
            .expect("quiet served");
        assert!(at <= 1, "quiet served at turn {at}: {order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let limiter = ImdsLimiter::new(LimiterConfig {
            max_concurrent: 1,
            max_per_window: 100,
            window: Duration::from_secs(1),
            max_wait: Duration::from_millis(100),
        });
        let held = limiter
            .acquire_for(Requester::new("a"))
            .await
            .expect("first");
        limiter
            .acquire_for(Requester::new("b"))
            .await
            .expect_err("busy");
        assert!(limiter.concurrency.lock().queue.is_empty());
        drop(held);
        let again = limiter
            .acquire_for(Requester::new("b"))
            .await
            .expect("free");
        drop(again);
        assert_eq!(limiter.concurrency.lock().in_flight, 0);
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
