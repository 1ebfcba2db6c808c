//! A live event stream over any [`Broker`]: resumes after a sequence, never skips, never repeats.

use std::sync::Arc;
use std::time::Duration;

use fleetq_core::Event;
use futures::Stream;

use crate::{Broker, Result};

/// Streams every event with `seq > after`, forever, in order. Errors are yielded and the stream
/// continues from the last delivered event, so a transient backend failure loses nothing.
pub fn subscribe<B: Broker>(broker: Arc<B>, after: u64) -> impl Stream<Item = Result<Event>> + Send {
    futures::stream::unfold((broker, after, Vec::<Event>::new()), |(broker, mut after, mut buf)| async move {
        loop {
            if !buf.is_empty() {
                let ev = buf.remove(0);
                after = ev.seq;
                return Some((Ok(ev), (broker, after, buf)));
            }
            match broker.events_after(after, 256, Duration::from_secs(5)).await {
                Ok(events) => buf = events,
                Err(e) => return Some((Err(e), (broker, after, buf))),
            }
        }
    })
}
