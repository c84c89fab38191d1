//! Watch streams: the replayed and live changes a watch's filter lets through, bookmarks, the
//! timeout, and the end of the stream when the server drops watches or the watcher lags.

use super::resource::filter_from;
use super::route::{ResourcePath, is_true};
use super::{Body, Shared};
use crate::status::ApiError;
use crate::store::{Change, Filter, Op};
use bytes::Bytes;
use http::{Response, header};
use http_body_util::{BodyExt as _, StreamBody};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// How often a watch that allows bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// What a watch sends for one change, given its filter (selector transitions included).
fn watch_event(change: &Change, filter: &Filter) -> Option<Value> {
    let ns = change.namespace.as_str();
    let new_match = filter.matches(ns, &change.new);
    let old_match = change.old.as_ref().is_some_and(|o| filter.matches(ns, o));
    let ty = match change.op {
        Op::Added if new_match => "ADDED",
        Op::Modified if old_match && new_match => "MODIFIED",
        Op::Modified if new_match => "ADDED",
        Op::Modified if old_match => "DELETED",
        Op::Deleted if new_match || old_match => "DELETED",
        _ => return None,
    };
    Some(json!({"type": ty, "object": change.new}))
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

pub(super) fn start_watch(
    shared: &Arc<Shared>,
    p: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let filter = filter_from(p, query)?;
    let send_initial = is_true(query.get("sendInitialEvents"));
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("resource version is not well formed: {rv}"))
        })?),
    };
    let (spec, start) = {
        let store = shared.store();
        let spec = store.kinds()[p.kind].clone();
        (spec, store.watch(p.kind, &filter, from))
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut drop_rx = shared.drop_tx.subscribe();
    drop_rx.mark_unchanged();
    match start {
        Err(e) => {
            // As the real server: 200, one ERROR event, end of stream.
            let ev = json!({"type": "ERROR", "object": e.to_status()});
            let _ = tx.try_send(line(&ev));
            drop(tx);
        }
        Ok(start) => {
            let kind = p.kind;
            tokio::spawn(async move {
                let bookmark = |rv: u64, end: bool| {
                    let mut md = json!({"resourceVersion": rv.to_string()});
                    if end {
                        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    }
                    line(&json!({"type": "BOOKMARK", "object": {
                        "kind": spec.kind, "apiVersion": spec.api_version(), "metadata": md}}))
                };
                let mut last = start.rv.max(from.unwrap_or(0));
                for c in &start.initial {
                    if let Some(ev) = watch_event(c, &filter)
                        && tx.send(line(&ev)).await.is_err()
                    {
                        return;
                    }
                }
                if send_initial && tx.send(bookmark(last, true)).await.is_err() {
                    return;
                }
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                let mut live = start.rx;
                let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
                tick.tick().await;
                loop {
                    let until_deadline = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = until_deadline => return,
                        _ = drop_rx.changed() => return,
                        _ = tx.closed() => return,
                        _ = tick.tick(), if bookmarks => {
                            if tx.send(bookmark(last, false)).await.is_err() {
                                return;
                            }
                        }
                        msg = live.recv() => match msg {
                            Ok(c) => {
                                last = last.max(c.rv);
                                if c.kind == kind
                                    && let Some(ev) = watch_event(&c, &filter)
                                    && tx.send(line(&ev)).await.is_err()
                                {
                                    return;
                                }
                            }
                            // A watcher too slow to keep up is closed, as kube-apiserver
                            // closes an unresponsive watcher: its client resumes from the last
                            // version it saw, replayed from the history window (410 only if
                            // that version left the window meanwhile).
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            });
        }
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::{FieldSelector, LabelSelector};

    #[test]
    fn watch_events_follow_selector_transitions() {
        let filter = Filter {
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::parse("spec.nodeName=n1").expect("selector"),
        };
        let on = |n: &str| json!({"metadata": {"name": "p"}, "spec": {"nodeName": n}});
        let change = |op, old: Option<Value>, new: Value| Change {
            rv: 1,
            kind: 0,
            namespace: "a".into(),
            op,
            old,
            new,
        };
        let ty = |c: Change| watch_event(&Arc::new(c), &filter).map(|e| e["type"].clone());
        assert_eq!(ty(change(Op::Added, None, on("n1"))), Some(json!("ADDED")));
        assert_eq!(ty(change(Op::Added, None, on("n2"))), None);
        assert_eq!(
            ty(change(Op::Modified, Some(on("n2")), on("n1"))),
            Some(json!("ADDED"))
        );
        assert_eq!(
            ty(change(Op::Modified, Some(on("n1")), on("n1"))),
            Some(json!("MODIFIED"))
        );
        assert_eq!(
            ty(change(Op::Modified, Some(on("n1")), on("n2"))),
            Some(json!("DELETED"))
        );
        assert_eq!(ty(change(Op::Modified, Some(on("n2")), on("n3"))), None);
        assert_eq!(
            ty(change(Op::Deleted, Some(on("n1")), on("n1"))),
            Some(json!("DELETED"))
        );
        assert_eq!(ty(change(Op::Deleted, Some(on("n2")), on("n2"))), None);
    }
}
