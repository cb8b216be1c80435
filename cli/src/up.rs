//! `moectl up`: a whole cluster on this host, one process per component on loopback.
//!
//! Children are this same binary run as `moectl coordinator|expert-worker|attention-worker`,
//! with `--watch-stdin`: they stop when their stdin closes, so they never outlive `moectl up`
//! (not even when it is killed with SIGKILL).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use moe_runtime::client::ClusterClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::default_model::default_model_dir;
use crate::gpu_plan;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (HF layout). Default: the built-in `medium` model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1, value_parser = crate::flags::positive::<usize>())]
    attention_workers: usize,
    #[arg(long, default_value_t = 2, value_parser = crate::flags::positive::<usize>())]
    expert_workers: usize,
    /// Client endpoint (the coordinator). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// KV cache blocks per attention worker.
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::positive::<usize>())]
    kv_blocks: usize,
    /// Token positions per KV block.
    #[arg(long, default_value_t = 16, value_parser = crate::flags::positive::<usize>())]
    block_size: usize,
    /// Attention workers: element type of the KV cache: `bf16` (2 bytes a value, rounded to
    /// nearest even), `f32` (4 bytes, exact) or `auto` (bf16 for a bfloat16/float16 checkpoint,
    /// f32 otherwise; by the config's `torch_dtype`).
    #[arg(long, default_value_t = moe_model::kv_cache::KvDtypeChoice::Auto)]
    kv_cache_dtype: moe_model::kv_cache::KvDtypeChoice,
    /// Requests in flight before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256, value_parser = crate::flags::positive::<usize>())]
    max_in_flight: usize,
    /// Require a bearer token on the client API (read from this file); clients pass it in
    /// `MOECTL_TOKEN`.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// The cluster token (read from this file) every component presents on the control plane
    /// and to the workers; operators pass it to `moectl drain`/`rebalance` in
    /// `MOECTL_CLUSTER_TOKEN`. Default: the `--auth-token-file` token.
    #[arg(long)]
    cluster_token_file: Option<PathBuf>,
    /// Capacity policy of the attention workers: exact (default), drop or recycle.
    #[arg(long, default_value = "exact", value_parser = ["exact", "drop", "recycle"])]
    capacity_policy: String,
    /// Serve the coordinator's Prometheus metrics here (prints `METRICS <addr>`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Seconds to wait for the cluster to serve.
    #[arg(long, default_value_t = 300)]
    ready_timeout: u64,
    /// Record membership in etcd at these endpoints (comma-separated) instead of in memory.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster key prefix in etcd.
    #[arg(long, default_value = "/hunyuan-moe/default", requires = "etcd")]
    etcd_prefix: String,
    /// etcd TLS: CA (PEM), and client certificate + key when etcd requires one.
    #[arg(long, requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Expert slots per layer per expert worker beyond an even share, for replicas of hot
    /// experts.
    #[arg(long, default_value_t = 0)]
    spare_slots: u32,
    /// Attention workers: token rows per expert slot per micro-batch (exact policy; default
    /// unlimited).
    #[arg(long, value_parser = crate::flags::positive::<usize>())]
    slot_capacity: Option<usize>,
    /// Attention workers: micro-batches per step, 1 or 2 (default: 2 under the exact capacity
    /// policy, so one half's attention runs while the other's experts compute; 1 otherwise).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    micro_batches: Option<u8>,
    /// Attention workers: with 2 micro-batches, the fewest rows per half for a step to be cut
    /// (default: the attention worker's; smaller steps run whole).
    #[arg(long, value_parser = crate::flags::positive::<usize>())]
    micro_batch_min_rows: Option<usize>,
    /// Attention workers: element type of the rows sent to expert workers, f32 (exact) or
    /// bf16 (half the bytes).
    #[arg(long, default_value_t = moe_proto::tensor::WireDtype::F32)]
    wire_dtype: moe_proto::tensor::WireDtype,
    /// Attention workers: requests running at once (default: the attention worker's).
    #[arg(long, value_parser = crate::flags::positive::<usize>())]
    max_running: Option<usize>,
    /// Attention workers: token rows per step, decode rows first, then prefill chunks
    /// (default: the attention worker's).
    #[arg(long, value_parser = crate::flags::positive::<usize>())]
    max_batch_tokens: Option<usize>,
    /// Attention workers: prefill rows a step may add, beyond one per decoding sequence, for
    /// prompts that arrive while others decode (default: the attention worker's).
    #[arg(long, value_parser = crate::flags::positive::<usize>())]
    prefill_rows_while_decoding: Option<usize>,
    /// Rebalance the expert placement by itself above this expected imbalance (0 = off).
    #[arg(long, default_value_t = 0.0)]
    rebalance_threshold: f64,
    /// TLS for every component (mutual on the control and data planes); `moectl gen-certs`
    /// writes a CA and a node certificate. Clients then need `MOECTL_TLS_CA`.
    #[command(flatten)]
    tls: moe_runtime::tls::TlsArgs,
    /// GPUs for the workers (e.g. `cuda:0,cuda:1`; needs a `cuda` build, NCCL and the GPUs):
    /// given out round robin, expert workers first, then attention workers. Expert workers run
    /// their products and attention workers their attention layers on theirs. When every
    /// worker has a GPU of its own they join the NCCL data plane (NCCL refuses two ranks on one
    /// GPU); otherwise layers go over gRPC, and a `GPUS` line says which.
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<String>,
    /// Start a worker again when it exits (at most 3 times a minute each); every exit is
    /// reported either way (an `EXITED` line).
    #[arg(long)]
    restart_workers: bool,
    /// Coordinators to start; more than one (a leader and standbys) needs `--etcd`.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::positive::<usize>())]
    coordinators: usize,
    /// Also start the OpenAI-compatible HTTP front end (`moectl frontend`) here, once the
    /// cluster serves (port 0: any free port); prints `HTTP http://<addr>`. It takes the
    /// `--auth-token-file` token from its clients and presents it to the coordinators.
    #[arg(long)]
    pub http: Option<SocketAddr>,
}

/// One child process of a local cluster, with what it takes to start it again.
pub(crate) struct Proc {
    pub role: &'static str,
    pub child: Child,
    pub pid: u32,
    pub address: SocketAddr,
    pub args: Vec<String>,
    pub started: std::time::Instant,
}

/// Starts `moectl <role> <args> --watch-stdin` and waits for its `LISTENING` line.
pub(crate) async fn spawn(role: &'static str, args: &[String]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the moectl binary")?;
    // Workers share this terminal: progress bars of several processes would overwrite each
    // other, so their loading is shown as log lines.
    let progress: &[&str] = if matches!(role, "attention-worker" | "expert-worker") {
        &["--progress", "log"]
    } else {
        &[]
    };
    let mut child = Command::new(exe)
        .arg(role)
        .args(args)
        .args(progress)
        .arg("--watch-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {role}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let address = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("METRICS ") {
                println!("{line}");
            }
            if let Some(rest) = line.strip_prefix("LISTENING ") {
                let addr = rest.split_whitespace().nth(1).context("malformed LISTENING line")?;
                return addr.parse::<SocketAddr>().context("bad address in LISTENING line");
            }
        }
        bail!("{role} exited before listening")
    })
    .await
    .with_context(|| format!("{role} did not start listening"))??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc {
        role,
        pid: child.id().unwrap_or(0),
        child,
        address,
        args: args.to_vec(),
        started: std::time::Instant::now(),
    })
}

/// A running local cluster.
pub struct LocalCluster {
    procs: Vec<Proc>,
    pub endpoint: String,
    /// The HTTP front end's address, with `--http`.
    pub http: Option<SocketAddr>,
}

impl LocalCluster {
    pub async fn start(args: &Args) -> anyhow::Result<Self> {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => default_model_dir()?,
        };
        let model_arg = model.to_string_lossy().into_owned();
        let mut procs = Vec::new();
        let mut coordinator_args = vec![
            "--model".into(),
            model_arg.clone(),
            "--listen".into(),
            args.listen.to_string(),
            "--min-expert-workers".into(),
            args.expert_workers.to_string(),
            "--max-in-flight".into(),
            args.max_in_flight.to_string(),
            "--rebalance-threshold".into(),
            args.rebalance_threshold.to_string(),
        ];
        if let Some(f) = &args.auth_token_file {
            coordinator_args.extend(["--auth-token-file".into(), f.to_string_lossy().into_owned()]);
        }
        if let Some(m) = args.metrics_listen {
            coordinator_args.extend(["--metrics-listen".into(), m.to_string()]);
        }
        if args.coordinators > 1 && args.etcd.is_empty() {
            bail!(
                "--coordinators {} needs --etcd: standbys find the leader through etcd",
                args.coordinators
            );
        }
        // What every component is given to prove itself to the others.
        let mut credential_args = Vec::new();
        if let (Some(c), Some(k), Some(ca)) = (&args.tls.tls_cert, &args.tls.tls_key, &args.tls.tls_ca) {
            for (flag, path) in [("--tls-cert", c), ("--tls-key", k), ("--tls-ca", ca)] {
                credential_args.extend([flag.to_owned(), path.to_string_lossy().into_owned()]);
            }
            if let Some(name) = &args.tls.tls_server_name {
                credential_args.extend(["--tls-server-name".to_owned(), name.clone()]);
            }
        }
        if let Some(f) = args.cluster_token_file.as_ref().or(args.auth_token_file.as_ref()) {
            credential_args.extend(["--cluster-token-file".into(), f.to_string_lossy().into_owned()]);
        }
        coordinator_args.extend(credential_args.iter().cloned());
        // Coordinators and workers alike: the workers record themselves in etcd.
        let mut etcd_args: Vec<String> = Vec::new();
        if !args.etcd.is_empty() {
            etcd_args.extend([
                "--etcd".into(),
                args.etcd.join(","),
                "--etcd-prefix".into(),
                args.etcd_prefix.clone(),
            ]);
            for (flag, path) in [
                ("--etcd-ca", &args.etcd_ca),
                ("--etcd-cert", &args.etcd_cert),
                ("--etcd-key", &args.etcd_key),
            ] {
                if let Some(p) = path {
                    etcd_args.extend([flag.to_owned(), p.to_string_lossy().into_owned()]);
                }
            }
        }
        coordinator_args.extend(etcd_args.iter().cloned());
        let mut endpoints = Vec::new();
        for i in 0..args.coordinators {
            let mut a = coordinator_args.clone();
            if i > 0 {
                // Standbys: any free port, no second metrics server.
                a[3] = "127.0.0.1:0".into();
                if let Some(at) = a.iter().position(|x| x == "--metrics-listen") {
                    a.drain(at..at + 2);
                }
            }
            let coordinator = spawn("coordinator", &a).await?;
            endpoints.push(coordinator.address.to_string());
            procs.push(coordinator);
        }
        let endpoint = endpoints.join(",");
        let mut common = vec![
            "--model".to_owned(),
            model_arg,
            "--coordinator".to_owned(),
            endpoint.clone(),
        ];
        common.extend(credential_args);
        common.extend(etcd_args);
        let gpus = gpu_plan::plan(&args.gpus, args.expert_workers, args.attention_workers);
        if let Some(line) = gpus.summary() {
            println!("{line}");
        }
        let mut expert_args = common.to_vec();
        expert_args.extend(["--spare-slots".into(), args.spare_slots.to_string()]);
        for gpu in &gpus.experts {
            let mut a = expert_args.clone();
            a.extend(gpus.flags(gpu));
            procs.push(spawn("expert-worker", &a).await?);
        }
        let mut attn_args = common.to_vec();
        attn_args.extend(["--capacity-policy".into(), args.capacity_policy.clone()]);
        if let Some(c) = args.slot_capacity {
            attn_args.extend(["--slot-capacity".into(), c.to_string()]);
        }
        if let Some(n) = args.micro_batches {
            attn_args.extend(["--micro-batches".into(), n.to_string()]);
        }
        if let Some(n) = args.micro_batch_min_rows {
            attn_args.extend(["--micro-batch-min-rows".into(), n.to_string()]);
        }
        if let Some(n) = args.max_running {
            attn_args.extend(["--max-running".into(), n.to_string()]);
        }
        if let Some(n) = args.max_batch_tokens {
            attn_args.extend(["--max-batch-tokens".into(), n.to_string()]);
        }
        if let Some(n) = args.prefill_rows_while_decoding {
            attn_args.extend(["--prefill-rows-while-decoding".into(), n.to_string()]);
        }
        attn_args.extend([
            "--wire-dtype".into(),
            args.wire_dtype.to_string(),
            "--kv-blocks".into(),
            args.kv_blocks.to_string(),
            "--block-size".into(),
            args.block_size.to_string(),
            "--kv-cache-dtype".into(),
            args.kv_cache_dtype.to_string(),
        ]);
        for gpu in &gpus.attention {
            let mut a = attn_args.clone();
            a.extend(gpus.flags(gpu));
            procs.push(spawn("attention-worker", &a).await?);
        }
        for p in &procs {
            println!("PROCESS {} pid={} addr={}", p.role, p.pid, p.address);
        }
        let token = match &args.auth_token_file {
            Some(f) => Some(moe_runtime::auth::read_token_file(f).with_context(|| format!("reading {}", f.display()))?),
            None => None,
        };
        let tls = args.tls.load(false)?.map(|t| t.client);
        let mut client = ClusterClient::with_options(&endpoint, token.as_deref(), tls.as_ref())?;
        let detail = client.wait_ready(Duration::from_secs(args.ready_timeout)).await?;
        eprintln!("cluster ready: {detail}");
        let mut http = None;
        if let Some(listen) = args.http {
            let mut a = vec![
                "--listen".to_owned(),
                listen.to_string(),
                "--coordinator".into(),
                endpoint.clone(),
                "--model".into(),
                model.to_string_lossy().into_owned(),
            ];
            if let Some(f) = &args.auth_token_file {
                let f = f.to_string_lossy().into_owned();
                a.extend([
                    "--auth-token-file".into(),
                    f.clone(),
                    "--cluster-auth-token-file".into(),
                    f,
                ]);
            }
            // The coordinators' client API is server TLS: the CA is enough.
            if let Some(ca) = &args.tls.tls_ca {
                a.extend(["--tls-ca".into(), ca.to_string_lossy().into_owned()]);
            }
            let frontend = spawn("frontend", &a).await?;
            println!(
                "PROCESS {} pid={} addr={}",
                frontend.role, frontend.pid, frontend.address
            );
            println!("HTTP http://{}", frontend.address);
            http = Some(frontend.address);
            procs.push(frontend);
        }
        Ok(LocalCluster { procs, endpoint, http })
    }

    /// Closing stdin asks each child to stop gracefully; whatever is left after a grace period
    /// is killed.
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            drop(p.child.stdin.take());
        }
        for p in self.procs.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.kill().await;
            }
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(&args).await?;
    println!("READY {}", cluster.endpoint);
    if let Some(http) = cluster.http {
        eprintln!("OpenAI API at http://{http}/v1 (try: curl http://{http}/v1/models)");
    }
    eprintln!(
        "serving; try: moectl generate --endpoint {} --prompt-ids 5,6,7 --max-tokens 16  (Ctrl-C stops the cluster)",
        cluster.endpoint
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("stopping the cluster (Ctrl-C)"),
        _ = term.recv() => eprintln!("stopping the cluster (SIGTERM)"),
        _ = crate::supervise::watch(&mut cluster.procs, args.restart_workers) => {}
    }
    cluster.stop().await;
    Ok(())
}

/// `moectl demo`: start a local cluster and its HTTP front end, send one chat request, print
/// the answer, stop.
pub async fn demo(mut args: Args, prompt: String, max_tokens: u32) -> anyhow::Result<()> {
    if args.http.is_none() {
        args.http = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let token = match &args.auth_token_file {
        Some(f) => Some(moe_runtime::auth::read_token_file(f).with_context(|| format!("reading {}", f.display()))?),
        None => None,
    };
    let cluster = LocalCluster::start(&args).await?;
    let http = cluster.http.expect("started with --http");
    eprintln!(
        "cluster ready at {}, HTTP front end at http://{http}; asking for {max_tokens} tokens (greedy)",
        cluster.endpoint
    );
    let result = crate::chat::ask(http, token.as_deref(), &prompt, max_tokens).await;
    cluster.stop().await;
    result
}
