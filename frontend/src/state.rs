use std::sync::Arc;

use moe_runtime::client::ClusterClient;

use crate::metrics::Metrics;
use crate::model::ServedModel;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub model: Arc<ServedModel>,
    pub client: ClusterClient,
    /// Bearer token HTTP clients must present on the API routes, when configured.
    pub token: Option<Arc<str>>,
    pub metrics: Arc<Metrics>,
}
