//! What every handler sees: the broker, the configuration, the duration statistics and the event
//! hub, behind one cheaply cloned [`AppState`].

use std::sync::Arc;

use fleetq_broker::Broker;

use crate::{ApiConfig, stats, stream};

/// What every handler sees.
pub(crate) struct AppState<B> {
    pub(crate) broker: Arc<B>,
    pub(crate) config: ApiConfig,
    pub(crate) stats: Arc<stats::DurationStats>,
    /// The process's one reader of the event log, shared by every stream.
    pub(crate) hub: Arc<stream::Hub>,
}

impl<B: Broker> AppState<B> {
    /// Every event after `after`, through the shared hub.
    pub(crate) fn feed(&self, after: u64) -> impl futures::Stream<Item = stream::Feed> + Send + use<B> {
        stream::feed(self.broker.clone(), self.hub.clone(), after)
    }
}

impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            hub: self.hub.clone(),
        }
    }
}
