//! What every service process does the same way: serve a set of gRPC routes on a bound port
//! until shutdown, and (for workers) heartbeat the coordinator on a fixed period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::{HeartbeatResponse, WorkerStatus};
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::service::Routes;

use crate::control::Membership;
use crate::load_progress::{LoadReporter, ProgressDisplay};
use crate::member::Member;
use crate::memory::ProcessMemory;
use crate::nccl::NcclAgent;
use crate::net;
use crate::record::RecordKeeper;
use crate::shutdown::Shutdown;

/// Binds `listen`, serves `routes` until `stop` resolves, and announces the bound address.
/// Only members of the cluster get through: every call must carry the cluster token when one
/// is installed (and, with TLS, the handshake already asked for a certificate).
pub async fn serve(
    role: &str,
    listen: SocketAddr,
    routes: Routes,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<Result<(), tonic::transport::Error>>)> {
    let builder = net::server().map_err(std::io::Error::other)?;
    let (incoming, local) = net::bind(listen).await?;
    let server = tokio::spawn(async move {
        let guard = crate::auth::RequireCluster::new(crate::auth::cluster_token().map(str::to_owned), false);
        let mut builder = builder.layer(tonic::service::InterceptorLayer::new(guard));
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
    });
    net::announce(role, local);
    Ok(server).map(|s| (local, s))
}

/// Heartbeats every `period` with what `status` reports and hands each answer to `on_answer`,
/// until `shutdown`. Transient failures are logged and retried; a refusal (the coordinator
/// rejects this worker: another model, a bad request) ends the loop with that status.
pub async fn heartbeat_loop(
    membership: &mut Membership,
    period: Duration,
    shutdown: Shutdown,
    mut status: impl FnMut() -> WorkerStatus,
    mut on_answer: impl AsyncFnMut(&mut Membership, HeartbeatResponse),
) -> Result<(), Status> {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shutdown.is_triggered() {
        ticker.tick().await;
        match membership.heartbeat(status()).await {
            Ok(answer) if answer.released => {
                tracing::info!("drained: released by the coordinator");
                return Ok(());
            }
            Ok(answer) => on_answer(membership, answer).await,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated
                ) =>
            {
                return Err(s);
            }
            Err(s) => tracing::warn!(status = %s, "heartbeat failed; retrying"),
        }
    }
    Ok(())
}

/// Logging to stderr, `RUST_LOG` overriding `default_level`.
pub fn init_tracing(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Why a worker stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator: {0}")]
    Coordinator(#[from] Status),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("reading the cluster token file {}: {source}", path.display())]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error(transparent)]
    Id(#[from] crate::member::BadWorkerId),
}

/// Flags every worker process takes.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Model directory (config.json + safetensors). Each worker reads only what it holds.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Address to serve on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address other components reach this worker at (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Coordinator control-plane address (host:port); several, comma-separated, when
    /// coordinators stand by for each other (the worker follows whichever leads).
    #[arg(long, required = true, value_delimiter = ',')]
    pub coordinator: Vec<String>,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,
    /// Exit when stdin closes (set by `moectl up`, so no worker outlives its cluster).
    #[arg(long)]
    pub watch_stdin: bool,
    /// Join the NCCL data plane on this GPU (`cuda:N`; needs a `cuda` build and NCCL). The
    /// communicator is set up through the coordinator; gRPC stays the fallback.
    #[arg(long)]
    pub nccl_device: Option<String>,
    /// This worker's id, kept for its whole life (e.g. the pod name); default: its role and a
    /// random suffix.
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Record this worker in etcd under its own lease (`--etcd` etc.), so that coordinators
    /// find it there and its record goes when it does.
    #[command(flatten)]
    pub etcd: crate::etcd::EtcdArgs,
    /// The cluster token (a file holding one line): presented on every call to the
    /// coordinator and the other workers, and required on every call to this worker.
    #[arg(long)]
    pub cluster_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// How weight loading is shown on stderr: `auto` (a progress bar on a terminal, log lines
    /// otherwise) or `log`.
    #[arg(long, value_enum, default_value_t = ProgressDisplay::Auto)]
    pub progress: ProgressDisplay,
}

impl WorkerArgs {
    /// Installs this worker's credentials: its TLS (every connection it serves must present a
    /// certificate) and the cluster token.
    pub fn install_credentials(&self) -> Result<(), WorkerError> {
        if let Some(tls) = self.tls.load(true).map_err(WorkerError::Tls)? {
            crate::tls::install(tls).map_err(WorkerError::Tls)?;
        }
        if let Some(path) = &self.cluster_token_file {
            let token = crate::auth::read_token_file(path).map_err(|source| WorkerError::TokenFile {
                path: path.clone(),
                source,
            })?;
            crate::auth::install_cluster_token(token)?;
        }
        Ok(())
    }

    /// The NCCL agent of `--nccl-device`, opened now so that a missing GPU or NCCL stops the
    /// worker at start-up with the reason.
    pub fn nccl_agent(&self) -> Result<Option<NcclAgent>, WorkerError> {
        self.nccl_device
            .as_deref()
            .map(|spec| NcclAgent::open(spec).map_err(|e| WorkerError::Nccl(e.to_string())))
            .transpose()
    }

    /// What this worker's loads report to: shown on stderr, and carried by its heartbeats once
    /// it is part of a [`WorkerSpec`].
    pub fn load_reporter(&self) -> Arc<LoadReporter> {
        Arc::new(LoadReporter::new(self.progress))
    }

    pub fn spec(
        &self,
        name: &'static str,
        role: moe_proto::v1::Role,
        model_id: String,
        grace: Duration,
        nccl: Option<NcclAgent>,
        load: Arc<LoadReporter>,
    ) -> Result<WorkerSpec, WorkerError> {
        let worker_id = match &self.worker_id {
            Some(id) => {
                crate::member::check_worker_id(id)?;
                id.clone()
            }
            None => crate::member::generated_worker_id(role),
        };
        Ok(WorkerSpec {
            name,
            role,
            worker_id,
            etcd: self.etcd.options()?,
            listen: self.listen,
            advertise: self.advertise.clone(),
            coordinator: self.coordinator.clone(),
            model_id,
            nccl,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            grace,
            load,
        })
    }
}

/// How a worker process joins the cluster.
#[derive(Clone)]
pub struct WorkerSpec {
    /// Name printed in the `LISTENING` line.
    pub name: &'static str,
    pub role: moe_proto::v1::Role,
    /// Kept for the life of the process.
    pub worker_id: String,
    /// Where this worker records itself, when the cluster lives in etcd.
    pub etcd: Option<crate::etcd::EtcdOptions>,
    pub listen: SocketAddr,
    /// Address others reach this worker at; default the bound address.
    pub advertise: Option<String>,
    pub coordinator: Vec<String>,
    pub model_id: String,
    /// Registers as a member of the NCCL data plane and keeps its communicator.
    pub nccl: Option<NcclAgent>,
    pub heartbeat: Duration,
    /// Time given to in-flight streams after shutdown.
    pub grace: Duration,
    /// The worker's weight loading, reported with every heartbeat.
    pub load: Arc<LoadReporter>,
}

/// Longest a draining worker waits to be released before it leaves anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// The whole life of a worker process: serve `routes`, register with the coordinator,
/// heartbeat with `status` and handle answers with `on_answer`, until `shutdown`, or until the
/// coordinator releases it after a drain (asked for by `drain`, SIGTERM, or `moectl drain`).
pub async fn run_worker(
    spec: WorkerSpec,
    routes: Routes,
    shutdown: Shutdown,
    drain: Shutdown,
    mut status: impl FnMut() -> WorkerStatus,
    mut on_answer: impl AsyncFnMut(&mut Membership, HeartbeatResponse),
) -> Result<(), WorkerError> {
    // The NCCL data plane's set-up, the loading progress and the process memory ride on the
    // heartbeats of every worker kind.
    let (nccl, load) = (spec.nccl.clone(), spec.load.clone());
    let mut status = move || {
        let memory = ProcessMemory::read();
        let mut s = WorkerStatus {
            nccl_ready_epoch: nccl.as_ref().map_or(0, NcclAgent::ready_epoch),
            resident_bytes: memory.resident_bytes,
            peak_resident_bytes: memory.peak_resident_bytes,
            ..status()
        };
        load.fill(&mut s);
        s
    };
    let nccl = spec.nccl.clone();
    let mut on_answer = async move |m: &mut Membership, answer: HeartbeatResponse| {
        if let Some(agent) = &nccl {
            agent.on_heartbeat(m, answer.nccl.clone()).await;
        }
        on_answer(m, answer).await
    };
    // The server stops on shutdown, or when this worker leaves after a drain.
    let (leave, left) = tokio::sync::oneshot::channel::<()>();
    let stop = {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.wait() => {}
                _ = left => {}
            }
        }
    };
    let (local, server) = serve(spec.name, spec.listen, routes, stop)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: spec.listen,
            source,
        })?;
    let me = Member {
        id: spec.worker_id.clone(),
        role: spec.role,
        address: spec.advertise.clone().unwrap_or_else(|| local.to_string()),
        model_id: spec.model_id.clone(),
        seq: 0,
        nccl: spec.nccl.is_some(),
        incarnation: crate::member::random_u64(),
    };
    let recorded = spec.etcd.is_some();
    let mut membership = Membership::register(&spec.coordinator, me.clone(), recorded, Duration::from_secs(30)).await?;
    // Recorded only once the coordinator took it (with the cluster credential): a record is an
    // invitation to serve, not to be written by a worker the cluster refuses.
    let record = spec.etcd.clone().map(|options| RecordKeeper::spawn(options, me));
    let drain_asked = tokio::select! {
        r = heartbeat_loop(&mut membership, spec.heartbeat, shutdown.clone(), &mut status, &mut on_answer) => {
            r?;
            false
        }
        _ = shutdown.clone().wait() => false,
        _ = drain.wait() => true,
    };
    if drain_asked {
        match membership.drain_self().await {
            Ok(detail) => {
                tracing::info!(%detail, "draining");
                let serving = heartbeat_loop(
                    &mut membership,
                    spec.heartbeat,
                    shutdown.clone(),
                    &mut status,
                    &mut on_answer,
                );
                match tokio::time::timeout(DRAIN_TIMEOUT, serving).await {
                    Ok(r) => r?,
                    Err(_) => tracing::warn!("not released within {DRAIN_TIMEOUT:?}; leaving anyway"),
                }
            }
            Err(s) => tracing::warn!(status = %s, "the coordinator refused the drain; leaving now"),
        }
    }
    if let Some(record) = record {
        record.remove().await;
    }
    let _ = leave.send(());
    let _ = tokio::time::timeout(spec.grace, server).await;
    tracing::info!(worker = spec.name, "stopped");
    Ok(())
}

/// Runs `main` on a multi-threaded runtime, then shuts the runtime down without waiting on
/// blocking reads that never end (the stdin watcher), so the process exits when `main` is done.
pub fn block_on<T>(main: impl std::future::Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let out = runtime.block_on(main);
    runtime.shutdown_timeout(Duration::from_secs(1));
    out
}
