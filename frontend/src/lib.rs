//! The OpenAI-compatible HTTP front end: a stateless process that tokenises, renders the
//! model's chat template, and speaks the cluster's client gRPC API to the coordinators
//! (following leader failover), so it scales horizontally beside them.

pub mod api_error;
pub mod chat;
mod error;
pub mod fields;
pub mod generate;
pub mod http_client;
pub mod metrics;
pub mod model;
pub mod output;
pub mod params;
pub mod respond;
pub mod routes;
pub mod sse;
pub mod state;
pub mod stop;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use error::{Error, Result};
use moe_runtime::client::ClusterClient;
use moe_runtime::tls::ClientTls;

use crate::model::ServedModel;
use crate::state::AppState;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// HTTP address to serve on (port 0: any free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The cluster's client endpoint(s): a coordinator, or a leader and its standbys
    /// (comma-separated), followed through failover. TLS to them: `--tls-ca`, or
    /// `MOECTL_TLS_CA` (and `MOECTL_TLS_CERT`/`_KEY`) as for every client command.
    #[arg(long, required = true)]
    pub coordinator: String,
    /// Model directory: only config.json, generation_config.json and the tokenizer files
    /// (hy.tiktoken, tokenizer_config.json) are read, never the weights.
    #[arg(long)]
    pub model: PathBuf,
    /// The model name clients use (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Bearer token HTTP clients must present on /v1/*, /tokenize and /detokenize (401 otherwise).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// The client token the coordinators require (their `--auth-token-file`).
    #[arg(long)]
    pub cluster_auth_token_file: Option<PathBuf>,
    /// TLS to the coordinators: the cluster CA (PEM) to trust (default: `MOECTL_TLS_CA`).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and key (PEM) to present to the coordinators, with `--tls-ca`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Stop when stdin closes (how `moectl up` ties its children's lives to its own).
    #[arg(long)]
    pub watch_stdin: bool,
}

fn read_token(path: &Option<PathBuf>) -> Result<Option<String>> {
    path.as_ref()
        .map(|p| {
            moe_runtime::auth::read_token_file(p).map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })
        })
        .transpose()
}

/// The shared state of a front end for `args` (model loaded, cluster client made).
pub fn state(args: &Args) -> Result<AppState> {
    let model = ServedModel::load(&args.model, args.served_model_name.clone())?;
    let cluster_token = read_token(&args.cluster_auth_token_file)?;
    let client_error = |status| Error::Client {
        endpoints: args.coordinator.clone(),
        status,
    };
    let client = match &args.tls_ca {
        Some(ca) => {
            let cert_key = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            let tls = ClientTls::from_files(ca, cert_key)
                .map_err(|e| client_error(tonic::Status::invalid_argument(format!("--tls-ca: {e}"))))?;
            ClusterClient::with_options(&args.coordinator, cluster_token.as_deref(), Some(&tls))
        }
        None => ClusterClient::with_token(&args.coordinator, cluster_token.as_deref()),
    }
    .map_err(client_error)?;
    Ok(AppState {
        model: Arc::new(model),
        client,
        token: read_token(&args.auth_token_file)?.map(Arc::from),
        metrics: Arc::default(),
    })
}

/// Serves until SIGTERM, Ctrl-C, or (with `--watch-stdin`) stdin closing. Prints
/// `LISTENING frontend <addr>` once bound.
pub async fn run(args: Args) -> Result<()> {
    let state = state(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: args.listen,
        source,
    })?;
    tracing::info!(%addr, model = %state.model.name, coordinator = %args.coordinator, "serving the OpenAI API");
    moe_runtime::net::announce("frontend", addr);
    let (trigger, shutdown) = moe_runtime::shutdown::channel();
    trigger.on_signals(args.watch_stdin);
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown.wait())
        .await
        .map_err(|source| Error::Listen {
            addr: args.listen,
            source,
        })
}
