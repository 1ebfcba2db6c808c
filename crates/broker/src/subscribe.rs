//! A live event stream over any broker's [`Log`]: resumes after a sequence, never skips, never repeats.

use std::sync::Arc;
use std::time::Duration;

use fleetq_core::Event;
use futures::Stream;

use crate::{Log, Result};

/// Pause after a failed read before trying again, so a down backend is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

struct State<B> {
    broker: Arc<B>,
    after: u64,
    buf: std::collections::VecDeque<Event>,
    failed: bool,
}

/// Streams every event with `seq > after`, forever, in order. A read error is yielded and the
/// stream continues (after a short pause) from the last delivered event, so nothing is lost.
pub fn subscribe<B: Log>(broker: Arc<B>, after: u64) -> impl Stream<Item = Result<Event>> + Send {
    let state = State { broker, after, buf: Default::default(), failed: false };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.buf.pop_front() {
                st.after = ev.seq;
                return Some((Ok(ev), st));
            }
            if std::mem::take(&mut st.failed) {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            match st.broker.events_after(st.after, 256, Duration::from_secs(5)).await {
                Ok(events) => st.buf.extend(events),
                Err(e) => {
                    st.failed = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
}
