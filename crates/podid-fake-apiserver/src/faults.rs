//! Fault injection and the request log tests assert on.

use crate::status::ApiError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Which error an injected fault answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `429 TooManyRequests` with `Retry-After: <seconds>`.
    TooManyRequests {
        /// Value of `Retry-After` and `details.retryAfterSeconds`.
        retry_after_secs: u64,
    },
    /// `500 InternalError`.
    InternalError,
}

impl FaultKind {
    fn error(self) -> ApiError {
        match self {
            Self::TooManyRequests { retry_after_secs } => {
                ApiError::too_many_requests(retry_after_secs)
            }
            Self::InternalError => ApiError::internal("injected fault"),
        }
    }
}

/// Which requests a fault applies to (every field that is set must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultMatch {
    /// HTTP method (`GET`, `POST`, …), compared case-insensitively.
    pub method: Option<String>,
    /// Kubernetes verb (`list`, `watch`, `get`, `create`, `update`, `patch`, `delete`).
    pub verb: Option<String>,
    /// A substring of the request path.
    pub path_contains: Option<String>,
}

impl FaultMatch {
    /// Matches every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Matches requests whose path contains `s`.
    pub fn path(s: &str) -> Self {
        Self {
            path_contains: Some(s.to_string()),
            ..Self::default()
        }
    }

    /// Also require the Kubernetes verb `verb`.
    pub fn with_verb(mut self, verb: &str) -> Self {
        self.verb = Some(verb.to_string());
        self
    }

    /// Also require the HTTP method `method`.
    pub fn with_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_string());
        self
    }

    fn matches(&self, method: &str, verb: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self.verb.as_deref().is_none_or(|v| v == verb)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.contains(p))
    }
}

/// One request as the server saw it (never its body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Kubernetes verb (`list`, `watch`, `get`, `create`, …; `get` for non-resource paths).
    pub verb: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (selectors, resourceVersion…).
    pub query: String,
    /// Status code answered (200 for a watch that started).
    pub code: u16,
}

#[derive(Debug)]
struct Rule {
    remaining: usize,
    kind: FaultKind,
    matcher: FaultMatch,
}

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    rules: Vec<Rule>,
    delay: Duration,
    log: Vec<RequestRecord>,
}

/// Shared fault state, owned by the server.
#[derive(Debug, Default)]
pub(crate) struct FaultCell(Mutex<FaultState>);

impl FaultCell {
    pub(crate) fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FaultState {
    /// The injected error for this request, if a rule fires (consuming one use).
    pub(crate) fn take(&mut self, method: &str, verb: &str, path: &str) -> Option<ApiError> {
        let rule = self
            .rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.matcher.matches(method, verb, path))?;
        rule.remaining -= 1;
        let err = rule.kind.error();
        self.rules.retain(|r| r.remaining > 0);
        Some(err)
    }

    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    pub(crate) fn record(&mut self, rec: RequestRecord) {
        self.log.push(rec);
    }
}

/// Handle for the fault hooks and the request log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Faults {
    pub(crate) cell: Arc<FaultCell>,
    pub(crate) shared: Arc<crate::server::Shared>,
}

impl Faults {
    /// The next `n` requests matching `matcher` answer with `kind`.
    pub fn fail_next(&self, n: usize, kind: FaultKind, matcher: FaultMatch) {
        self.cell.lock().rules.push(Rule {
            remaining: n,
            kind,
            matcher,
        });
    }

    /// Removes every pending injected failure.
    pub fn clear_failures(&self) {
        self.cell.lock().rules.clear();
    }

    /// Delays every response (watch streams: their start) by `d`; `Duration::ZERO` turns it off.
    pub fn set_delay(&self, d: Duration) {
        self.cell.lock().delay = d;
    }

    /// Ends every open watch stream now (clients see the connection's body end).
    pub fn drop_watches(&self) {
        self.shared.drop_watches();
    }

    /// Forgets the event history: a watch from any version before now gets `410 Expired`.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Every request seen so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.cell.lock().log.clone()
    }

    /// How many requests used `verb` on a path containing `path_contains`.
    pub fn count(&self, verb: &str, path_contains: &str) -> usize {
        self.cell
            .lock()
            .log
            .iter()
            .filter(|r| r.verb == verb && r.path.contains(path_contains))
            .count()
    }

    /// Empties the request log.
    pub fn clear_log(&self) {
        self.cell.lock().log.clear();
    }
}
