//! [`TokenBroker`]: the cache, single-flight, proactive refresh, stale-if-error and revocation.
//!
//! Each [`CacheKey`](crate::CacheKey) has one slot in a [`DashMap`]. A slot holds the cached token (if any), the
//! instant from which a hit triggers a background refresh, and the receiver of the upstream
//! call in flight (if any). Upstream calls run in their own tokio task, so a caller that goes
//! away does not cancel the call the others wait for; no map lock is held across an await.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use podid_imds::unix_seconds;
use tokio::sync::watch;

use super::clock::Clock;
use super::error::BrokerError;
use super::evict;
use super::identity::{Credential, IdentityKey, IdentitySpec};
use super::key::{CacheKey, IdentityView, KeyParts, KeyView, Lookup};
use super::limiter::Requester;
use super::source::{FetchRequest, SourceKind, Sources};
use super::stats::BrokerStats;
use super::token::Token;

/// Broker tuning.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// A token is refreshed in the background once it is this close to expiry (default 5 min).
    /// For short-lived tokens the margin is capped at half the token's lifetime.
    pub refresh_margin: Duration,
    /// Most entries kept; beyond it expired entries go first, then the least recently used
    /// entry of the requester (pod) holding the most entries (`evict`).
    pub max_entries: usize,
    /// After a failed background refresh, how long hits keep serving the cached token before
    /// trying again (unless upstream's `Retry-After` asks for longer).
    pub refresh_retry: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(300),
            max_entries: 10_000,
            refresh_retry: Duration::from_secs(10),
        }
    }
}

type FetchResult = Result<Arc<Token>, BrokerError>;

/// The tokens of one answer, the primary tenant's first, then one per auxiliary tenant. Almost
/// always one, held inline then: a cache hit builds no `Vec`. Reads as a slice.
#[derive(Debug, Clone)]
pub enum Tokens {
    /// The primary tenant's token only.
    One(Arc<Token>),
    /// Any number of tokens.
    Many(Vec<Arc<Token>>),
}

impl Tokens {
    /// The tokens as a `Vec`.
    pub fn into_vec(self) -> Vec<Arc<Token>> {
        match self {
            Self::One(token) => vec![token],
            Self::Many(tokens) => tokens,
        }
    }
}

impl std::ops::Deref for Tokens {
    type Target = [Arc<Token>];

    fn deref(&self) -> &[Arc<Token>] {
        match self {
            Self::One(token) => std::slice::from_ref(token),
            Self::Many(tokens) => tokens,
        }
    }
}

impl From<Vec<Arc<Token>>> for Tokens {
    fn from(tokens: Vec<Arc<Token>>) -> Self {
        Self::Many(tokens)
    }
}

/// The tokens of one [`TokenBroker::issue`] call and where they came from.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The primary tenant's token first, then one per auxiliary tenant. Never empty.
    pub tokens: Tokens,
    /// Whether every token was served from the cache without waiting for an upstream call
    /// (for audit records; a request that joined a call in flight is a miss).
    pub cached: bool,
}
type InFlight = watch::Receiver<Option<FetchResult>>;

struct Slot {
    token: Option<Arc<Token>>,
    /// The identity whose upstream call filled the slot: background refreshes run with it, not
    /// with whoever happens to hit the entry inside the refresh margin.
    spec: Option<Arc<IdentitySpec>>,
    /// Unix milliseconds from which a hit triggers a background refresh.
    refresh_at_ms: u64,
    /// Unix milliseconds before which no new background refresh starts (after a failure).
    retry_not_before_ms: u64,
    last_refresh_failed: bool,
    inflight: Option<InFlight>,
    generation: u64,
    /// Unix milliseconds of the last access, for LRU eviction.
    last_used_ms: AtomicU64,
    /// The requester whose request created the entry (eviction hits the largest owner first).
    owner: Requester,
}

impl Slot {
    fn new(generation: u64, now_ms: u64) -> Self {
        Self {
            token: None,
            spec: None,
            refresh_at_ms: 0,
            retry_not_before_ms: 0,
            last_refresh_failed: false,
            inflight: None,
            generation,
            last_used_ms: AtomicU64::new(now_ms),
            owner: Requester::current(),
        }
    }

    fn valid_token(&self, now_ms: u64) -> Option<&Arc<Token>> {
        self.token
            .as_ref()
            .filter(|t| now_ms < t.expires_on.saturating_mul(1000))
    }
}

struct Inner {
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    sources: Sources,
    slots: DashMap<CacheKey, Slot>,
    stats: Arc<BrokerStats>,
    generation: AtomicU64,
}

/// The token broker. Cheap to clone (all clones share one cache). Must be used inside a tokio
/// runtime: upstream calls run as spawned tasks.
#[derive(Clone)]
pub struct TokenBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBroker")
            .field("config", &self.inner.config)
            .field("entries", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

fn unix_millis(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TokenBroker {
    /// A broker over `sources`, reading time from `clock`.
    pub fn new(config: BrokerConfig, sources: Sources, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                clock,
                sources,
                slots: DashMap::new(),
                stats: Arc::new(BrokerStats::default()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The broker's counters.
    pub fn stats(&self) -> &Arc<BrokerStats> {
        &self.inner.stats
    }

    /// Number of cache entries (including entries whose first fetch is in flight).
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// A token for `identity` and `resource`, for the identity's primary tenant.
    pub async fn token(&self, identity: &Arc<IdentitySpec>, resource: &str) -> FetchResult {
        let tenant = identity.primary_tenant_as_given();
        self.token_for(identity, resource, tenant)
            .await
            .map(|(token, _)| token)
    }

    /// The tokens for `identity` and `resource`: the primary tenant's first, then one per auxiliary
    /// tenant (type 1 with `auxiliaryTenantIDs`, docs/upstream.md#token-sources). Upstream requires
    /// one to three auxiliary tenants when the list is set; more is a [`BrokerError::Config`].
    pub async fn tokens(
        &self,
        identity: &Arc<IdentitySpec>,
        resource: &str,
    ) -> Result<Vec<Arc<Token>>, BrokerError> {
        self.issue(identity, resource)
            .await
            .map(|issued| issued.tokens.into_vec())
    }

    /// [`TokenBroker::tokens`], also telling whether the answer came from the cache.
    pub async fn issue(
        &self,
        identity: &Arc<IdentitySpec>,
        resource: &str,
    ) -> Result<Issued, BrokerError> {
        let aux = &identity.auxiliary_tenant_ids;
        if aux.len() > 3 {
            return Err(BrokerError::Config {
                client_id: identity.client_id.clone(),
                reason: "must specify one to three auxiliary tenants".to_owned(),
            });
        }
        let (token, mut cached) = self
            .token_for(identity, resource, identity.primary_tenant_as_given())
            .await?;
        if aux.is_empty() || identity.primary_tenant_as_given().is_none() {
            return Ok(Issued {
                tokens: Tokens::One(token),
                cached,
            });
        }
        let mut tokens = Vec::with_capacity(1 + aux.len());
        tokens.push(token);
        for tenant in aux {
            let (token, hit) = self
                .token_for(identity, resource, Some(tenant.as_str()))
                .await?;
            tokens.push(token);
            cached &= hit;
        }
        Ok(Issued {
            tokens: Tokens::Many(tokens),
            cached,
        })
    }

    /// The cached token of `identity` for `resource` when the cache can answer on its own: a
    /// valid token that is not yet due for refresh, for an identity with one tenant. `None`
    /// otherwise (nothing is counted then): call [`TokenBroker::issue`], which also starts
    /// refreshes and fetches. Builds no key and no [`IdentitySpec`].
    pub fn cached(&self, identity: IdentityView<'_>, resource: &str) -> Option<Issued> {
        // (Other types never get a slot: `issue` refuses them before creating one.)
        if !identity.single_tenant {
            return None;
        }
        let view = KeyView {
            identity_type: identity.identity_type,
            client_id: identity.client_id,
            resource_id: identity.resource_id,
            resource,
            tenant: identity.tenant,
            subject: identity.subject,
            authority: identity.authority,
            origin: None,
        };
        let inner = &self.inner;
        let now_ms = unix_millis(inner.clock.now());
        let slot = inner.slots.get(&view as &dyn KeyParts)?;
        let token = slot.valid_token(now_ms)?.clone();
        if now_ms >= slot.refresh_at_ms {
            return None;
        }
        slot.last_used_ms.store(now_ms, Ordering::Relaxed);
        drop(slot);
        inner.stats.hit();
        Some(Issued {
            tokens: Tokens::One(token),
            cached: true,
        })
    }

    /// Drop every cache entry of `identity` at once (identity, binding or assignment deleted or
    /// changed). Upstream calls in flight for it still answer their waiters but are not cached.
    pub fn invalidate_identity(&self, identity: &IdentityKey) {
        self.inner.slots.retain(|key, _| key.identity != *identity);
    }

    /// Drop every entry whose token has expired and that has no call in flight.
    pub fn purge_expired(&self) {
        let now_ms = unix_millis(self.inner.clock.now());
        self.inner
            .slots
            .retain(|_, slot| slot.inflight.is_some() || slot.valid_token(now_ms).is_some());
    }

    async fn token_for(
        &self,
        identity: &Arc<IdentitySpec>,
        resource: &str,
        tenant: Option<&str>,
    ) -> Result<(Arc<Token>, bool), BrokerError> {
        let inner = &self.inner;
        let Some(kind) = SourceKind::for_identity(identity) else {
            return Err(BrokerError::Config {
                client_id: identity.client_id.clone(),
                reason: format!(
                    "unsupported identity type {}",
                    identity.identity_type.as_i64()
                ),
            });
        };
        if matches!(kind, SourceKind::ClientSecret | SourceKind::Certificate)
            && identity.origin.is_none()
        {
            // Without its origin the key could not tell this credential from another one.
            return Err(BrokerError::Config {
                client_id: identity.client_id.clone(),
                reason: "the credential's origin (its Secret) is unknown".to_owned(),
            });
        }
        let lookup = Lookup {
            identity,
            resource,
            tenant,
        };
        let now_ms = unix_millis(inner.clock.now());

        // Fast path: a shared read of the slot, looked up without building an owned key.
        if let Some(slot) = inner.slots.get(&lookup as &dyn KeyParts) {
            slot.last_used_ms.store(now_ms, Ordering::Relaxed);
            if let Some(token) = slot.valid_token(now_ms) {
                let token = token.clone();
                if now_ms < slot.refresh_at_ms {
                    inner.stats.hit();
                    return Ok((token, true));
                }
                let refresh = slot.inflight.is_none() && now_ms >= slot.retry_not_before_ms;
                let stale = slot.last_refresh_failed;
                drop(slot);
                if refresh {
                    self.start_refresh(&CacheKey::of(&lookup), identity, kind, now_ms);
                }
                inner.stats.hit();
                if stale {
                    inner.stats.serve_stale();
                }
                return Ok((token, true));
            }
        }

        // Miss: join the call in flight or start one, under the entry lock.
        inner.stats.miss();
        let key = CacheKey::of(&lookup);
        self.make_room(&key, now_ms);
        let mut receiver = match inner.slots.entry(key.clone()) {
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                if let Some(token) = slot.valid_token(now_ms) {
                    // Filled while we were getting here: no upstream wait for this request.
                    return Ok((token.clone(), true));
                }
                match &slot.inflight {
                    Some(receiver) => {
                        inner.stats.coalesce();
                        receiver.clone()
                    }
                    None => {
                        let receiver = self.spawn_fetch(&key, identity, kind, slot.generation);
                        slot.inflight = Some(receiver.clone());
                        receiver
                    }
                }
            }
            Entry::Vacant(vacant) => {
                let generation = inner.generation.fetch_add(1, Ordering::Relaxed);
                let mut slot = Slot::new(generation, now_ms);
                let receiver = self.spawn_fetch(&key, identity, kind, generation);
                slot.inflight = Some(receiver.clone());
                vacant.insert(slot);
                receiver
            }
        };
        match receiver.wait_for(Option::is_some).await {
            Ok(result) => match &*result {
                Some(result) => result.clone().map(|token| (token, false)),
                None => Err(lost(identity, kind)),
            },
            Err(_) => Err(lost(identity, kind)),
        }
    }

    /// Start one background refresh for `key` unless one is already running. It runs with the
    /// entry's own identity (the one whose call filled it), not the requester's: the requester
    /// only triggers it. For a federated entry the token is bound to the requesting pod (same
    /// service account, the key says so), since the pod that filled the entry may be gone.
    fn start_refresh(
        &self,
        key: &CacheKey,
        requester: &Arc<IdentitySpec>,
        kind: SourceKind,
        now_ms: u64,
    ) {
        if let Some(mut slot) = self.inner.slots.get_mut(key)
            && slot.inflight.is_none()
            && now_ms >= slot.retry_not_before_ms
        {
            let identity = match &slot.spec {
                Some(own) => refresh_spec(own, requester),
                None => requester.clone(),
            };
            let receiver = self.spawn_fetch(key, &identity, kind, slot.generation);
            slot.inflight = Some(receiver);
            self.inner.stats.background_refresh();
        }
    }

    /// Spawn the upstream call for `key`; its result is stored in the slot of `generation` (if
    /// that slot still exists) and broadcast to the returned receiver.
    fn spawn_fetch(
        &self,
        key: &CacheKey,
        identity: &Arc<IdentitySpec>,
        kind: SourceKind,
        generation: u64,
    ) -> InFlight {
        let (sender, receiver) = watch::channel(None);
        let inner = self.inner.clone();
        let key = key.clone();
        let request = FetchRequest {
            identity: identity.clone(),
            resource: key.resource.clone(),
            tenant: key.tenant.clone(),
            requester: Requester::current(),
        };
        tokio::spawn(async move {
            let source = inner.sources.get(kind).clone();
            inner.stats.upstream_call(kind);
            let fetched = source.fetch(&request).await;
            let now = inner.clock.now();
            let result = match fetched {
                Ok(token) if token.is_valid_at(now) => Ok(Arc::new(token)),
                Ok(_) => Err(BrokerError::Unavailable {
                    source_kind: kind,
                    client_id: request.identity.client_id.clone(),
                    reason: "upstream returned an already expired token".to_owned(),
                    retry_after: None,
                }),
                Err(error) => Err(error),
            };
            if result.is_err() {
                inner.stats.upstream_error(kind);
            }
            inner.store(&key, generation, &request.identity, &result, now);
            // Nobody waiting is fine (background refresh).
            let _ = sender.send(Some(result));
        });
        receiver
    }

    /// Evict before inserting a new key if the cache is full.
    fn make_room(&self, key: &CacheKey, now_ms: u64) {
        let inner = &self.inner;
        if inner.slots.len() < inner.config.max_entries || inner.slots.contains_key(key) {
            return;
        }
        let before = inner.slots.len();
        inner
            .slots
            .retain(|_, slot| slot.inflight.is_some() || slot.valid_token(now_ms).is_some());
        let inserting = Requester::current();
        while inner.slots.len() >= inner.config.max_entries {
            let chosen = {
                let candidates: Vec<_> = inner
                    .slots
                    .iter()
                    .filter(|e| e.value().inflight.is_none())
                    .map(|e| {
                        let slot = e.value();
                        (
                            e.key().clone(),
                            slot.owner.clone(),
                            slot.last_used_ms.load(Ordering::Relaxed),
                        )
                    })
                    .collect();
                evict::victim(
                    candidates
                        .iter()
                        .map(|(key, owner, used)| (key, owner, *used)),
                    &inserting,
                )
                .cloned()
            };
            match chosen {
                Some(oldest) => {
                    inner.slots.remove(&oldest);
                }
                None => break,
            }
        }
        for _ in inner.slots.len()..before {
            inner.stats.evict();
        }
    }
}

impl Inner {
    /// Record the outcome of an upstream call in its slot, unless the slot was invalidated.
    fn store(
        &self,
        key: &CacheKey,
        generation: u64,
        spec: &Arc<IdentitySpec>,
        result: &FetchResult,
        now: SystemTime,
    ) {
        let now_ms = unix_millis(now);
        let Some(mut slot) = self.slots.get_mut(key) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.inflight = None;
        match result {
            Ok(token) => {
                let expires_ms = token.expires_on.saturating_mul(1000);
                let lifetime = expires_ms.saturating_sub(now_ms);
                let margin = duration_millis(self.config.refresh_margin).min(lifetime / 2);
                slot.refresh_at_ms = expires_ms - margin;
                slot.retry_not_before_ms = 0;
                slot.last_refresh_failed = false;
                slot.token = Some(token.clone());
                slot.spec = Some(spec.clone());
            }
            Err(error) => {
                // Stale-if-error: keep a still-valid token, back off before the next refresh.
                let wait = error
                    .retry_after()
                    .unwrap_or_default()
                    .max(self.config.refresh_retry);
                slot.retry_not_before_ms = now_ms.saturating_add(duration_millis(wait));
                slot.last_refresh_failed = true;
                if slot.valid_token(now_ms).is_none() {
                    drop(slot);
                    self.slots.remove_if(key, |_, s| {
                        s.generation == generation && s.inflight.is_none()
                    });
                }
            }
        }
        tracing::debug!(source = ?key.identity.identity_type(), ok = result.is_ok(), now = unix_seconds(now), "token fetch done");
    }
}

/// The identity a background refresh of an entry filled by `own` runs with: `own`, except that a
/// federated token is bound to the requesting pod when both bind one (the key holds the service
/// account, so both pods run as it).
fn refresh_spec(own: &Arc<IdentitySpec>, requester: &Arc<IdentitySpec>) -> Arc<IdentitySpec> {
    if let (
        Credential::Federated {
            subject,
            bound_pod: Some(own_pod),
        },
        Credential::Federated {
            subject: requester_subject,
            bound_pod: Some(requester_pod),
        },
    ) = (&own.credential, &requester.credential)
        && subject == requester_subject
        && own_pod != requester_pod
    {
        let mut spec = IdentitySpec::clone(own);
        spec.credential = Credential::Federated {
            subject: subject.clone(),
            bound_pod: Some(requester_pod.clone()),
        };
        return Arc::new(spec);
    }
    own.clone()
}

fn lost(identity: &IdentitySpec, kind: SourceKind) -> BrokerError {
    BrokerError::Unavailable {
        source_kind: kind,
        client_id: identity.client_id.clone(),
        reason: "token fetch task ended without a result".to_owned(),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::Semaphore;

    use super::super::clock::ManualClock;
    use super::super::identity::Secret;
    use super::super::source::{SourceFuture, TokenSource};
    use super::*;

    const T0: u64 = 1_700_000_000;

    /// Counts calls; each call waits for a permit of `gate` when one is set.
    #[derive(Debug)]
    struct Counting {
        clock: Arc<ManualClock>,
        calls: AtomicUsize,
        gate: Option<Semaphore>,
    }

    impl TokenSource for Counting {
        fn kind(&self) -> SourceKind {
            SourceKind::Imds
        }

        fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = &self.gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                let now = unix_seconds(self.clock.now());
                Ok(Token::new(
                    format!("tok-{n}"),
                    request.resource.clone(),
                    now + 3600,
                ))
            })
        }
    }

    fn broker(gated: bool) -> (TokenBroker, Arc<Counting>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::at_unix(T0));
        let source = Arc::new(Counting {
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
            gate: gated.then(|| Semaphore::new(0)),
        });
        let broker = TokenBroker::new(
            BrokerConfig::default(),
            Sources::all(source.clone()),
            clock.clone(),
        );
        (broker, source, clock)
    }

    #[tokio::test]
    async fn issue_reports_miss_then_hit_including_during_refresh() {
        let (broker, source, clock) = broker(false);
        let id = Arc::new(IdentitySpec::managed("c1", ""));
        let first = broker.issue(&id, "r").await.expect("token");
        assert!(!first.cached, "the first answer waited for upstream");
        assert_eq!(first.tokens.len(), 1);
        let second = broker.issue(&id, "r").await.expect("token");
        assert!(second.cached);
        assert_eq!(
            second.tokens[0].access_token(),
            first.tokens[0].access_token()
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        // Inside the refresh margin: still served from the cache while a refresh runs.
        clock.advance(Duration::from_secs(3600 - 60));
        let third = broker.issue(&id, "r").await.expect("token");
        assert!(third.cached);
        // Another resource is another key: a miss.
        let other = broker.issue(&id, "r2").await.expect("token");
        assert!(!other.cached);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_joining_a_call_in_flight_is_a_miss() {
        let (broker, source, _clock) = broker(true);
        let id = Arc::new(IdentitySpec::managed("c1", ""));
        let leader = tokio::spawn({
            let (broker, id) = (broker.clone(), id.clone());
            async move { broker.issue(&id, "r").await }
        });
        let follower = tokio::spawn({
            let (broker, id) = (broker.clone(), id.clone());
            async move { broker.issue(&id, "r").await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Both are in once the second joined the first's call.
        while broker.stats().coalesced() < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second request never joined the call in flight"
            );
            tokio::task::yield_now().await;
        }
        source.gate.as_ref().expect("gated").add_permits(1);
        let leader = leader.await.expect("join").expect("token");
        let follower = follower.await.expect("join").expect("token");
        assert!(!leader.cached);
        assert!(!follower.cached);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn auxiliary_tenants_are_cached_only_when_all_are() {
        let (broker, source, _clock) = broker(false);
        let mut spec = IdentitySpec::client_secret("c2", "t0", Secret::new("s"));
        spec.auxiliary_tenant_ids = vec!["t1".to_owned()];
        let id = Arc::new(spec);
        let first = broker.issue(&id, "r").await.expect("tokens");
        assert_eq!(first.tokens.len(), 2);
        assert!(!first.cached);
        assert!(broker.issue(&id, "r").await.expect("tokens").cached);
        // Drop only the auxiliary tenant's entry: the answer is no longer all from the cache.
        broker
            .inner
            .slots
            .retain(|key, _| key.tenant.as_deref() != Some("t1"));
        let partial = broker.issue(&id, "r").await.expect("tokens");
        assert!(!partial.cached);
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn borrowed_lookup_matches_the_owned_key_ignoring_id_and_tenant_case() {
        let (broker, source, _clock) = broker(false);
        let rid = "/subscriptions/S/resourceGroups/RG/providers/x/ID";
        broker
            .issue(&Arc::new(IdentitySpec::managed("Client-1", rid)), "r")
            .await
            .expect("token");
        let hit = broker
            .issue(
                &Arc::new(IdentitySpec::managed("CLIENT-1", rid.to_lowercase())),
                "r",
            )
            .await
            .expect("token");
        assert!(hit.cached, "client id and resource id ignore case");
        // Same client id, another resource id: hashed alike, still another key.
        let other = broker
            .issue(&Arc::new(IdentitySpec::managed("client-1", "/other")), "r")
            .await
            .expect("token");
        assert!(!other.cached);
        // The resource is compared exactly.
        let upper = broker
            .issue(&Arc::new(IdentitySpec::managed("client-1", rid)), "R")
            .await
            .expect("token");
        assert!(!upper.cached);
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);

        let sp = |tenant: &str| {
            Arc::new(IdentitySpec::client_secret(
                "sp",
                tenant,
                Secret::new("s3cret"),
            ))
        };
        assert!(!broker.issue(&sp("Tenant-A"), "r").await.expect("sp").cached);
        assert!(broker.issue(&sp("tenant-a"), "r").await.expect("sp").cached);
        assert!(!broker.issue(&sp("tenant-b"), "r").await.expect("sp").cached);
        assert_eq!(source.calls.load(Ordering::SeqCst), 5);
    }
    /// Issues `tok-<n>` for the client secret `right` and refuses any other credential, as
    /// Entra would; records the client id and authority of every call as given; each call
    /// waits for a permit of `gate` when one is set.
    #[derive(Debug)]
    struct Judging {
        clock: Arc<ManualClock>,
        calls: std::sync::Mutex<Vec<(String, String)>>,
        gate: Option<Semaphore>,
    }

    impl TokenSource for Judging {
        fn kind(&self) -> SourceKind {
            SourceKind::ClientSecret
        }

        fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
            Box::pin(async move {
                let n = {
                    let mut calls = self.calls.lock().expect("calls");
                    calls.push((
                        request.identity.client_id.clone(),
                        request.identity.ad_endpoint.clone(),
                    ));
                    calls.len()
                };
                if let Some(gate) = &self.gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                match &request.identity.credential {
                    Credential::ClientSecret(secret) if secret.expose() == "right" => {
                        let now = unix_seconds(self.clock.now());
                        Ok(Token::new(
                            format!("tok-{n}"),
                            request.resource.clone(),
                            now + 3600,
                        ))
                    }
                    _ => Err(BrokerError::Refused {
                        source_kind: SourceKind::ClientSecret,
                        client_id: request.identity.client_id.clone(),
                        status: 401,
                        error: "invalid_client".to_owned(),
                        description: "AADSTS7000215: Invalid client secret provided.".to_owned(),
                    }),
                }
            })
        }
    }

    fn judging(gated: bool) -> (TokenBroker, Arc<Judging>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::at_unix(T0));
        let source = Arc::new(Judging {
            clock: clock.clone(),
            calls: std::sync::Mutex::new(Vec::new()),
            gate: gated.then(|| Semaphore::new(0)),
        });
        let broker = TokenBroker::new(
            BrokerConfig::default(),
            Sources::all(source.clone()),
            clock.clone(),
        );
        (broker, source, clock)
    }

    /// The victim's identity: its Secret `default/victim` holds the right secret.
    fn victim() -> IdentitySpec {
        IdentitySpec::client_secret("victim-client", "tenant-1", Secret::new("right"))
            .with_origin_in("default", "victim")
    }

    /// The attacker's identity in `evil`: the victim's client id and tenant, its own Secret.
    fn attacker(secret: &str) -> IdentitySpec {
        IdentitySpec::client_secret("victim-client", "tenant-1", Secret::new(secret))
            .with_origin_in("evil", "stolen")
    }

    #[tokio::test]
    async fn another_secret_with_the_victims_ids_never_gets_the_victims_token() {
        let (broker, source, _clock) = judging(false);
        let victims = Arc::new(victim());
        let token = broker.issue(&victims, "r").await.expect("victim's token");
        // Theft: same client id, tenant and resource, a wrong secret: no cache hit, Entra asked
        // with the attacker's own (wrong) credential, which it refuses.
        let error = broker
            .issue(&Arc::new(attacker("wrong")), "r")
            .await
            .expect_err("the attacker's credential is refused");
        assert!(matches!(error, BrokerError::Refused { .. }), "{error}");
        assert_eq!(source.calls.lock().expect("calls").len(), 2);
        // Even the right secret under another Secret's name is another entry (the origin is
        // part of the key), so the attacker cannot tell from a hit that a guess was right.
        let guessed = broker
            .issue(&Arc::new(attacker("right")), "r")
            .await
            .expect("a correct secret gets its own token");
        assert!(!guessed.cached);
        // Poisoning: another authority is another entry, and the victim still gets its own.
        let mut elsewhere = attacker("right");
        elsewhere.ad_endpoint = "https://attacker.example/".to_owned();
        let poisoned = broker.issue(&Arc::new(elsewhere), "r").await.expect("own");
        assert!(!poisoned.cached);
        let again = broker.issue(&victims, "r").await.expect("victim's token");
        assert!(again.cached);
        assert_eq!(
            again.tokens[0].access_token(),
            token.tokens[0].access_token()
        );
        // A Secret-held credential without origin is refused rather than cached under a key
        // that cannot tell whose it is.
        let mut anonymous = victim();
        anonymous.origin = None;
        let error = broker
            .issue(&Arc::new(anonymous), "r")
            .await
            .expect_err("no origin");
        assert!(matches!(error, BrokerError::Config { .. }), "{error}");
    }

    #[tokio::test]
    async fn identities_resolving_to_the_same_credential_share_one_entry() {
        let (broker, source, _clock) = judging(false);
        // Two AzureIdentities naming the same Secret (same namespace, name and content), one
        // spelling the ids and the authority in another case: one credential, one entry.
        let mut one = victim();
        one.ad_endpoint = "https://login.microsoftonline.com/".to_owned();
        let mut two =
            IdentitySpec::client_secret("VICTIM-CLIENT", "Tenant-1", Secret::new("right"))
                .with_origin_in("default", "victim");
        two.ad_endpoint = " https://LOGIN.microsoftonline.com/".to_owned();
        assert!(!broker.issue(&Arc::new(one), "r").await.expect("one").cached);
        assert!(broker.issue(&Arc::new(two), "r").await.expect("two").cached);
        assert_eq!(source.calls.lock().expect("calls").len(), 1);
        assert_eq!(broker.len(), 1);
        // The same Secret name with other content (rotated): another entry.
        let rotated =
            IdentitySpec::client_secret("victim-client", "tenant-1", Secret::new("right "))
                .with_origin_in("default", "victim");
        assert_ne!(rotated.origin, victim().origin);
    }

    #[tokio::test]
    async fn a_background_refresh_runs_with_the_entrys_own_identity() {
        let (broker, source, clock) = judging(false);
        let mut own = victim();
        own.ad_endpoint = "https://login.microsoftonline.com/".to_owned();
        broker.issue(&Arc::new(own), "r").await.expect("filled");
        // Inside the refresh margin, a request with the same key but another spelling of the
        // authority triggers the refresh: it must run with the entry's spec.
        clock.advance(Duration::from_secs(3600 - 60));
        let mut requester = victim();
        requester.ad_endpoint = "HTTPS://LOGIN.MICROSOFTONLINE.COM/".to_owned();
        let hit = broker.issue(&Arc::new(requester), "r").await.expect("hit");
        assert!(hit.cached);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while broker.stats().background_refreshes() < 1
            || source.calls.lock().expect("calls").len() < 2
        {
            assert!(tokio::time::Instant::now() < deadline, "no refresh started");
            tokio::task::yield_now().await;
        }
        let calls = source.calls.lock().expect("calls").clone();
        assert_eq!(
            calls[1].1, "https://login.microsoftonline.com/",
            "the refresh used the requester's spec: {calls:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_attacker_flight_is_not_joined_by_the_victim() {
        let (broker, source, _clock) = judging(true);
        let attacker = tokio::spawn({
            let broker = broker.clone();
            async move { broker.issue(&Arc::new(attacker("wrong")), "r").await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while source.calls.lock().expect("calls").is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no attacker call");
            tokio::task::yield_now().await;
        }
        // The victim asks while the attacker's call is in flight: its own flight, not a join.
        let victim_request = tokio::spawn({
            let broker = broker.clone();
            async move { broker.issue(&Arc::new(victim()), "r").await }
        });
        while source.calls.lock().expect("calls").len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the victim joined the attacker's flight"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(broker.stats().coalesced(), 0);
        source.gate.as_ref().expect("gated").add_permits(2);
        assert!(attacker.await.expect("join").is_err());
        let victim = victim_request
            .await
            .expect("join")
            .expect("the victim's own token");
        assert!(!victim.cached);
    }

    #[tokio::test]
    async fn a_pod_filling_the_cache_evicts_its_own_entries_first() {
        let clock = Arc::new(ManualClock::at_unix(T0));
        let source = Arc::new(Counting {
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
            gate: None,
        });
        let broker = TokenBroker::new(
            BrokerConfig {
                max_entries: 4,
                ..BrokerConfig::default()
            },
            Sources::all(source.clone()),
            clock.clone(),
        );
        let id = Arc::new(IdentitySpec::managed("c1", ""));
        let quiet = Requester::new("app/quiet");
        let noisy = Requester::new("app/noisy");
        quiet
            .clone()
            .scope(broker.issue(&id, "quiet-resource"))
            .await
            .expect("token");
        for i in 0..20 {
            clock.advance(Duration::from_secs(1));
            noisy
                .clone()
                .scope(broker.issue(&id, &format!("noisy-{i}")))
                .await
                .expect("token");
        }
        assert_eq!(broker.len(), 4);
        assert!(broker.stats().evictions() > 0);
        let again = quiet
            .scope(broker.issue(&id, "quiet-resource"))
            .await
            .expect("token");
        assert!(
            again.cached,
            "the quiet pod's entry survived the noisy pod's churn"
        );
    }
}
