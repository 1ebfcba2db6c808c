//! Event feeds for SSE and WebSocket: resume after a sequence, notice when the log was trimmed past
//! the resume point (so the client re-reads the snapshot instead of silently missing events), and
//! filter by topic.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::HeaderMap;
use fleetq_broker::Broker;
use fleetq_core::{Event, EventKind};
use futures::{Stream, StreamExt};

use crate::error::ApiError;

/// What a feed yields.
#[derive(Debug, Clone)]
pub(crate) enum Feed {
    /// The next event.
    Event(Box<Event>),
    /// Events after the resume point were trimmed from the log; the client must reload the snapshot.
    Gap {
        /// The resume point asked for.
        after: u64,
        /// The first event still available.
        first: u64,
    },
}

/// Every event after `after`, in order, forever. Read errors are logged and retried by
/// [`fleetq_broker::subscribe`], which continues from the last delivered event.
pub(crate) fn feed<B: Broker>(broker: Arc<B>, after: u64) -> impl Stream<Item = Feed> + Send {
    let mut checked = after == 0;
    fleetq_broker::subscribe(broker, after)
        .filter_map(|item| {
            std::future::ready(match item {
                Ok(ev) => Some(ev),
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: read failed; retrying");
                    None
                }
            })
        })
        .flat_map(move |ev| {
            let mut out = Vec::with_capacity(2);
            if !std::mem::replace(&mut checked, true) && ev.seq > after + 1 {
                out.push(Feed::Gap { after, first: ev.seq });
            }
            out.push(Feed::Event(Box::new(ev)));
            futures::stream::iter(out)
        })
}

/// Topics a client can filter the global stream by.
pub(crate) const TOPICS: [&str; 4] = ["jobs", "workers", "connectors", "machines"];

/// The topic of an event.
pub(crate) fn topic(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::WorkerRegistered { .. } | EventKind::WorkerRemoved { .. } => "workers",
        EventKind::ConnectorStatus { .. } => "connectors",
        EventKind::Machine { .. } => "machines",
        _ => "jobs",
    }
}

/// Parses a comma-separated topic list; empty or absent means all topics.
pub(crate) fn parse_topics(text: Option<&str>) -> Result<BTreeSet<&'static str>, ApiError> {
    let mut out = BTreeSet::new();
    for t in text.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let known = TOPICS.iter().find(|k| **k == t).ok_or_else(|| {
            ApiError::bad_request("topics", format!("unknown topic {t:?}; topics are {}", TOPICS.join(", ")))
        })?;
        out.insert(*known);
    }
    if out.is_empty() {
        out.extend(TOPICS);
    }
    Ok(out)
}

/// The resume point: the `Last-Event-ID` header (what `EventSource` sends on reconnect), else the
/// `since` query parameter. `None` means "from now".
pub(crate) fn resume_point(headers: &HeaderMap, since: Option<&str>) -> Result<Option<u64>, ApiError> {
    if let Some(v) = headers.get("last-event-id") {
        let text = v.to_str().unwrap_or("");
        return text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request("Last-Event-ID", "must be an event sequence number"));
    }
    since
        .map(|s| s.parse().map_err(|_| ApiError::bad_request("since", "must be an event sequence number")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse() {
        assert_eq!(parse_topics(None).unwrap().len(), 4);
        assert_eq!(
            parse_topics(Some("jobs, workers")).unwrap().into_iter().collect::<Vec<_>>(),
            ["jobs", "workers"]
        );
        let e = parse_topics(Some("jobs,nope")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("topics"));
    }

    #[test]
    fn resume_from_header_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None).unwrap(), None);
        assert_eq!(resume_point(&h, Some("7")).unwrap(), Some(7));
        assert!(resume_point(&h, Some("x")).is_err());
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(resume_point(&h, Some("7")).unwrap(), Some(42), "the header wins");
        h.insert("last-event-id", "-1".parse().unwrap());
        assert!(resume_point(&h, None).is_err());
    }
}
