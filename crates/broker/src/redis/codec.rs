//! Decoding and encoding between Redis values and fleetq types: job summaries as flat field/value
//! pairs (the job hash and the event stream entries share the layout), stream entries as [`Event`]s.

use fleetq_core::job::DEFAULT_MAX_ATTEMPTS;
use fleetq_core::{Event, EventKind, JobSpec, JobSummary};
use redis::Value;
use serde_json::{Map, Value as Json};

use crate::{BrokerError, Result};

const NUMERIC: &[&str] = &[
    "attempt",
    "max_attempts",
    "priority",
    "workflow_priority",
    "workflow_datetime",
    "step_number",
    "progress",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "run_at",
    "service_crashes",
];
const BOOLEAN: &[&str] = &["cancel_requested", "unworkable"];
/// Summary fields kept as strings (anything not listed here or above is ignored on decode).
const STRING: &[&str] =
    &["id", "service", "partition", "status", "workflow_id", "customer_id", "owner", "worker_id", "message"];

pub(super) fn corrupt(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Corrupt(e.to_string())
}

/// The text of a scalar reply.
pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The items of an array reply (nil is empty).
pub(super) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(kv) => kv.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// A flat `[k1, v1, k2, v2, …]` reply as pairs.
pub(super) fn pairs(v: Value) -> Vec<(String, String)> {
    let list = items(v);
    list.chunks_exact(2).filter_map(|kv| Some((text(&kv[0])?, text(&kv[1])?))).collect()
}

/// The text at `i` of a list, or a corruption error naming what was expected.
pub(super) fn text_at(list: &[Value], i: usize, what: &str) -> Result<String> {
    list.get(i).and_then(text).ok_or_else(|| corrupt(format!("missing {what} in reply")))
}

/// A summary as hash fields (derived `unworkable` left out).
pub(super) fn summary_to_pairs(s: &JobSummary) -> Result<Vec<(String, String)>> {
    let Json::Object(map) = serde_json::to_value(s).map_err(corrupt)? else {
        return Err(corrupt("summary is not an object"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let v = match v {
            Json::Null => continue,
            _ if k == "unworkable" => continue,
            Json::String(s) => s,
            Json::Bool(b) => if b { "1" } else { "0" }.to_owned(),
            Json::Number(n) => n.to_string(),
            other => other.to_string(),
        };
        out.push((k, v));
    }
    Ok(out)
}

/// A summary from hash fields or stream entry fields (unknown fields are ignored).
pub(super) fn summary_from_pairs(pairs: &[(String, String)]) -> Result<JobSummary> {
    let mut map = Map::new();
    for (k, v) in pairs {
        let k = k.as_str();
        if v.is_empty() {
            continue; // absent optional field
        }
        let value = if NUMERIC.contains(&k) {
            serde_json::from_str::<Json>(v).map_err(|e| corrupt(format!("field {k}={v:?}: {e}")))?
        } else if BOOLEAN.contains(&k) {
            Json::Bool(v == "1")
        } else if k == "error" {
            serde_json::from_str(v).map_err(|e| corrupt(format!("field error: {e}")))?
        } else if STRING.contains(&k) {
            Json::String(v.clone())
        } else {
            continue;
        };
        map.insert(k.to_owned(), value);
    }
    // A new job's state leaves these out (zero, default, or its creation time).
    for k in ["attempt", "priority", "progress"] {
        map.entry(k).or_insert(Json::from(0));
    }
    map.entry("max_attempts").or_insert(Json::from(DEFAULT_MAX_ATTEMPTS));
    if let Some(created) = map.get("created_at").cloned() {
        map.entry("updated_at").or_insert(created);
    }
    serde_json::from_value(Json::Object(map)).map_err(|e| corrupt(format!("job summary: {e}")))
}

/// A summary from the stored state document (a JSON object of strings) and the derived
/// unworkable flag (`"1"`/`"0"`).
pub(super) fn summary_from_state(state: &str, unworkable: &str) -> Result<JobSummary> {
    let map: Map<String, Json> =
        serde_json::from_str(state).map_err(|e| corrupt(format!("job state: {e}")))?;
    let mut fields: Vec<(String, String)> = map
        .into_iter()
        .filter_map(|(k, v)| match v {
            Json::String(s) => Some((k, s)),
            Json::Number(n) => Some((k, n.to_string())),
            _ => None,
        })
        .collect();
    fields.push(("unworkable".into(), unworkable.to_owned()));
    summary_from_pairs(&fields)
}

/// A `[state json, unworkable]` reply as a summary.
pub(super) fn summary_value(v: Value) -> Result<JobSummary> {
    let list = items(v);
    summary_from_state(&text_at(&list, 0, "job state")?, &text_at(&list, 1, "unworkable flag")?)
}

/// The state document of a new job: its summary fields and the internal ones the functions need,
/// less what is zero or derivable (the functions and [`summary_from_pairs`] default them): a
/// pending job's document stays under 256 bytes, a smaller allocation class.
pub(super) fn initial_state(s: &JobSummary, extra: &[(&str, String)]) -> Result<String> {
    let mut map = Map::new();
    for (k, v) in summary_to_pairs(s)? {
        let zero = matches!(
            (k.as_str(), v.as_str()),
            ("attempt" | "priority", "0") | ("progress", "0" | "0.0") | ("cancel_requested", "0")
        ) || (k == "max_attempts" && s.max_attempts == DEFAULT_MAX_ATTEMPTS);
        let derived = k == "updated_at" && s.updated_at == s.created_at;
        if !zero && !derived {
            map.insert(k, Json::String(v));
        }
    }
    for (k, v) in extra {
        map.insert((*k).to_owned(), Json::String(v.clone()));
    }
    serde_json::to_string(&map).map_err(corrupt)
}

/// A spec as stored: without the top-level fields that hold their defaults (priority 0, the
/// default attempts), which deserialization fills back in.
pub(super) fn stored_spec(spec: &JobSpec) -> Result<String> {
    let Json::Object(mut map) = serde_json::to_value(spec).map_err(corrupt)? else {
        return Err(corrupt("spec is not an object"));
    };
    if spec.priority == 0 {
        map.remove("priority");
    }
    if spec.max_attempts == DEFAULT_MAX_ATTEMPTS {
        map.remove("max_attempts");
    }
    serde_json::to_string(&map).map_err(corrupt)
}

/// One stream entry `[id, [field, value, …]]` as an event. An entry whose body does not decode
/// keeps its sequence as an [`EventKind::Undecodable`] event (counted, logged), so one bad record never stops a reader.
/// Only an entry without a readable id — not something Redis streams hold — is an error.
pub(super) fn event_from_entry(entry: Value) -> Result<Event> {
    let mut parts = items(entry).into_iter();
    let id = parts.next().as_ref().and_then(text).ok_or_else(|| corrupt("stream entry without id"))?;
    let fields = pairs(parts.next().unwrap_or(Value::Nil));
    let seq = id
        .split_once('-')
        .and_then(|(_, seq)| seq.parse::<u64>().ok())
        .ok_or_else(|| corrupt(format!("stream id {id}")))?;
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let at = get("at").and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let kind = event_kind(seq, &get).unwrap_or_else(|e| {
        let reason = e.to_string();
        crate::note_undecodable(&format!("event {seq}"), &reason);
        EventKind::Undecodable { reason }
    });
    Ok(Event { seq, at, kind })
}

fn event_kind<'a>(seq: u64, get: &impl Fn(&str) -> Option<&'a str>) -> Result<EventKind> {
    if let Some(data) = get("d") {
        return serde_json::from_str(data).map_err(|e| corrupt(format!("event {seq}: {e}")));
    }
    let state = get("j").ok_or_else(|| corrupt(format!("event {seq} without job state")))?;
    let job = summary_from_state(state, get("u").unwrap_or("0"))?;
    Ok(match get("t").unwrap_or_default() {
        "job_submitted" => EventKind::JobSubmitted { job },
        "job_claimed" => EventKind::JobClaimed { job },
        "job_progress" => EventKind::JobProgress { job },
        "job_requeued" => EventKind::JobRequeued { job, reason: get("r").unwrap_or_default().to_owned() },
        "job_completed" => EventKind::JobCompleted { job },
        "job_failed" => EventKind::JobFailed { job },
        "job_cancel_requested" => EventKind::JobCancelRequested { job },
        "job_cancelled" => EventKind::JobCancelled { job },
        "job_retried" => EventKind::JobRetried { job },
        other => return Err(corrupt(format!("event {seq} of unknown type {other:?}"))),
    })
}

/// Job views of a listing, skipping (counted, logged) any that do not decode: one bad record
/// never hides the others.
pub(super) fn summaries(list: Value) -> Vec<JobSummary> {
    items(list)
        .into_iter()
        .filter_map(|v| {
            summary_value(v).map_err(|e| crate::note_undecodable("a job in a listing", &e.to_string())).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fleetq_core::{JobError, JobId, JobSpec, JobStatus};
    use serde_json::json;

    use super::*;

    #[test]
    fn summary_round_trips_through_pairs() {
        let mut spec = JobSpec::new("comfyui", json!(null));
        spec.workflow_id = Some("wf".into());
        spec.workflow_datetime = Some((1 << 48) - 1);
        spec.priority = i32::MIN;
        let mut s = JobSummary::new_pending(JobId("j1".into()), &spec, 1_700_000_000_123);
        s.status = JobStatus::InProgress;
        s.progress = 42.5;
        s.message = Some("sampling 3/20".into());
        s.cancel_requested = true;
        s.error = Some(JobError::retryable(fleetq_core::FailureCategory::Connection, "down"));
        let back = summary_from_pairs(&summary_to_pairs(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
