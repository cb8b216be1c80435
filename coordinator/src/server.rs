//! Coordinator start-up: one port serves the client API and the control plane.

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_model::ModelConfig;
use moe_proto::v1::control_server::ControlServer;
use moe_proto::v1::inference_server::InferenceServer;
use moe_runtime::auth::{RequireBearer, RequireCluster};
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use moe_runtime::shutdown;
use moe_runtime::tls::TlsArgs;
use tokio::sync::Semaphore;

use crate::cluster::ClusterConfig;
use crate::control::ControlService;
use crate::error::{Error, Result};
use crate::inference::{Handoff, InferenceService};
use crate::leader::{self, Election, LeaderGate};
use crate::metrics;
use crate::placements::BalanceConfig;
use crate::registry::{EtcdOptions, EtcdRegistry, InMemoryRegistry, Registry};
use crate::state;
use crate::store::Store;
use tonic::service::interceptor::InterceptedService;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model directory; the coordinator reads config.json and the safetensors headers only.
    #[arg(long)]
    pub model: PathBuf,
    /// Client API and control plane address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Expert workers to wait for before the first placement.
    #[arg(long, default_value_t = 1)]
    pub min_expert_workers: usize,
    /// Requests in flight (queued or running) before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "256")]
    pub max_in_flight: NonZeroUsize,
    /// A worker not heard from for this long is dropped.
    #[arg(long, default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,
    /// How long a request waits for the cluster to be ready before UNAVAILABLE.
    #[arg(long, default_value_t = 30_000)]
    pub ready_timeout_ms: u64,
    /// Require `authorization: Bearer <token>` on the client API, the token read from this file.
    /// Off by default (local use); for production put the API behind this and TLS.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// The cluster token: required on every control-plane call (workers registering and
    /// heartbeating, operators' `drain` and `rebalance`) and presented to the workers. Without
    /// it the control plane takes the `--auth-token-file` token; with neither (and no TLS) it
    /// is open, for local use only.
    #[arg(long)]
    pub cluster_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics (`/metrics`) and a health probe (`/healthz`) over HTTP here.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Exit when stdin closes (set by `moectl up`).
    #[arg(long)]
    pub watch_stdin: bool,
    #[command(flatten)]
    pub etcd: ElectionArgs,
    /// TLS: the client API then takes clients with or without a certificate (they have the
    /// bearer token); the control plane requires one (mutual TLS with the workers).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Expert load is counted over this moving window (seconds).
    #[arg(long, default_value = "30")]
    pub load_window_s: NonZeroU64,
    /// Rebalance the expert placement by itself when its expected imbalance (max/mean expert
    /// worker load, worst layer) over the window passes this, e.g. 1.3; 0 = only on
    /// `moectl rebalance`.
    #[arg(long, default_value_t = 0.0, value_parser = rebalance_threshold)]
    pub rebalance_threshold: f64,
    /// Least seconds between two automatic rebalances.
    #[arg(long, default_value_t = 60)]
    pub rebalance_interval_s: u64,
}

/// `--rebalance-threshold`: 0 (off) or above 1, since max/mean load is never below 1 (a
/// threshold at or under 1 would rebalance all the time). Refuses NaN too.
fn rebalance_threshold(s: &str) -> std::result::Result<f64, String> {
    let t: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if t == 0.0 || t > 1.0 {
        Ok(t)
    } else {
        Err(format!("{t} must be 0 (off) or above 1 (max/mean load)"))
    }
}

/// Where the cluster is recorded. Without `--etcd` the coordinator keeps it in memory (one
/// coordinator, nothing to install); with it, several coordinators elect a leader through etcd,
/// a standby takes over what the leader recorded, and workers record themselves.
#[derive(clap::Args, Debug, Clone)]
pub struct ElectionArgs {
    #[command(flatten)]
    pub etcd: moe_runtime::etcd::EtcdArgs,
    /// Address workers and clients reach this coordinator at, announced in the election
    /// (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Leadership lease: a dead leader is replaced after at most this long.
    #[arg(long, default_value_t = 5)]
    pub leader_ttl_s: u64,
}

impl ElectionArgs {
    fn options(&self) -> Result<Option<EtcdOptions>> {
        let options = self.etcd.options()?;
        if options.is_some() && self.leader_ttl_s < 2 {
            return Err(crate::registry::RegistryError::TtlTooShort.into());
        }
        Ok(options)
    }
}

/// The largest client message the API takes: a batch of as many requests as may be in flight,
/// each with a prompt as long as the context (an id takes at most 5 bytes on the wire) and a
/// generous 64 KiB for the rest. Nothing valid is larger; a larger one is refused
/// (OUT_OF_RANGE) before it is buffered, not decoded into memory first.
fn client_message_limit(context: usize, max_in_flight: usize) -> usize {
    let per_request = 5 * context + (64 << 10);
    per_request.saturating_mul(max_in_flight).min(MAX_MESSAGE_BYTES)
}

fn read_token(path: Option<&PathBuf>, what: &str) -> Result<Option<String>> {
    path.map(|path| {
        moe_runtime::auth::read_token_file(path).map_err(|source| Error::Io {
            context: format!("reading the {what} file {}", path.display()),
            source,
        })
    })
    .transpose()
}

/// The credentials of the two planes: the client API's guard, and the control plane's (which
/// also installs the cluster token this coordinator presents to the workers).
fn credentials(args: &Args, tls_on: bool) -> Result<(RequireBearer, RequireCluster)> {
    let client_token = read_token(args.auth_token_file.as_ref(), "token")?;
    let cluster_token = match read_token(args.cluster_token_file.as_ref(), "cluster token")? {
        Some(t) => Some(t),
        None => {
            if client_token.is_some() {
                tracing::warn!(
                    "no --cluster-token-file: the control plane takes the client token, so every API client can also act as a worker or operator"
                );
            }
            client_token.clone()
        }
    };
    if let Some(t) = &cluster_token {
        moe_runtime::auth::install_cluster_token(t.clone())?;
    }
    let control = RequireCluster::new(cluster_token, tls_on);
    if control.is_open() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "the control plane is open (no --cluster-token-file, --auth-token-file or TLS): anyone who reaches this port can register or drain workers"
        );
    }
    Ok((RequireBearer::new(client_token), control))
}

pub async fn run(args: Args) -> Result<()> {
    let max_in_flight = args.max_in_flight.get();
    let tls = args.tls.load(false).map_err(Error::Tls)?;
    let tls_on = tls.is_some();
    if let Some(tls) = tls {
        tracing::info!("TLS on: mutual TLS on the control plane");
        moe_runtime::tls::install(tls).map_err(Error::Tls)?;
    }
    let (client_guard, control_guard) = credentials(&args, tls_on)?;
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let max_position_embeddings = config.max_position_embeddings;
    let ckpt = moe_model::checkpoint::Checkpoint::open(&args.model)?;
    let model_id = moe_model::identity::model_identity(&args.model, &ckpt)?;
    drop(ckpt);
    let etcd = args.etcd.options()?;
    let mut registry: Box<dyn Registry> = match &etcd {
        Some(options) => Box::new(EtcdRegistry::connect(options.clone()).await?),
        None => Box::new(InMemoryRegistry::default()),
    };
    registry.claim(&model_id).await?;
    let state = state::spawn(
        ClusterConfig {
            model: config.clone(),
            model_id: model_id.clone(),
            min_expert_workers: args.min_expert_workers,
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            members_in_etcd: etcd.is_some(),
            balance: BalanceConfig {
                window: Duration::from_secs(args.load_window_s.get()),
                threshold: args.rebalance_threshold,
                min_interval: Duration::from_secs(args.rebalance_interval_s),
                ..BalanceConfig::default()
            },
        },
        Store::spawn(registry, Duration::from_secs(1)),
    );
    let admission = Arc::new(Semaphore::new(max_in_flight));
    let requests = Arc::new(crate::latency::RequestMetrics::default());
    let inference = InferenceService {
        state: state.clone(),
        config,
        admission: admission.clone(),
        max_in_flight,
        handoff: Arc::new(Handoff {
            state: state.clone(),
            ready_timeout: Duration::from_millis(args.ready_timeout_ms),
            channels: Mutex::new(Default::default()),
            metrics: requests.clone(),
        }),
    };
    let (incoming, local) = net::bind(args.listen).await.map_err(|source| Error::Io {
        context: format!("binding {}", args.listen),
        source,
    })?;
    let (trigger, shutdown) = shutdown::channel();
    trigger.on_signals(args.watch_stdin);
    let serving = match etcd {
        Some(etcd) => Election {
            etcd,
            candidate: args.etcd.advertise.clone().unwrap_or_else(|| local.to_string()),
            ttl: Duration::from_secs(args.etcd.leader_ttl_s),
        }
        .spawn(state.clone(), shutdown.clone()),
        None => leader::lead_alone(&state).await,
    };
    if let Some(addr) = args.metrics_listen {
        let (incoming, local) = metrics::bind(addr).await.map_err(|source| Error::Io {
            context: format!("binding the metrics address {addr}"),
            source,
        })?;
        // Not a `LISTENING` line: launchers take the first of those as the API address.
        println!("METRICS {local}");
        tokio::spawn(metrics::serve(
            incoming,
            metrics::MetricsSource {
                state: state.clone(),
                admission: admission.clone(),
                max_in_flight,
                serving: serving.clone(),
                requests,
                dispatch_history: Default::default(),
            },
        ));
    }
    tracing::info!(%local, %model_id, "coordinator listening");
    net::announce("coordinator", local);
    let gate = LeaderGate { serving };
    let server = net::server()?
        .add_service(InterceptedService::new(
            InterceptedService::new(
                InferenceServer::new(inference)
                    .max_decoding_message_size(client_message_limit(max_position_embeddings, max_in_flight))
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                client_guard,
            ),
            gate.clone(),
        ))
        .add_service(InterceptedService::new(
            InterceptedService::new(ControlServer::new(ControlService { state }), control_guard),
            gate,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().wait());
    tokio::select! {
        r = server => r?,
        _ = async {
            shutdown.wait().await;
            // Client streams may be long; give them a moment after the signal.
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => {}
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_message_limit_follows_the_context_and_the_admission_bound() {
        // A13B: 256K context, 256 in flight: about 335 MB, far below the 1 GiB transport cap.
        assert_eq!(client_message_limit(262_144, 1), 5 * 262_144 + 65_536);
        assert_eq!(client_message_limit(262_144, 256), 256 * (5 * 262_144 + 65_536));
        assert_eq!(client_message_limit(1 << 30, 1 << 20), MAX_MESSAGE_BYTES);
    }
}
