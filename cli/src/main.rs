//! `moectl`: the operator and client CLI of the Hunyuan MoE cluster.

mod bench;
mod certs;
mod chat;
mod check_golden;
mod default_model;
mod flags;
mod gen_model;
mod generate;
mod gpu_bench;
mod gpu_plan;
mod machine;
mod remote;
mod supervise;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moectl",
    version,
    about = "Operate and use a Hunyuan MoE expert-parallel cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole cluster on this host (separate processes on loopback) and serve until Ctrl-C.
    Up(up::Args),
    /// Start a local cluster and its HTTP front end, send one chat request through them, print
    /// the answer's text and token ids, stop.
    Demo {
        #[command(flatten)]
        cluster: up::Args,
        /// The user message.
        #[arg(long, default_value = "Hello! Who are you?")]
        prompt: String,
        #[arg(long, default_value_t = 16)]
        max_tokens: u32,
    },
    /// Generate tokens: through a cluster (--endpoint) or on the single-process engine.
    Generate(generate::Args),
    /// Chat in the terminal with a model behind the HTTP front end (answers stream; reasoning
    /// on stderr).
    Chat(chat::Args),
    /// Show the cluster's workers, roles, experts, load and KV use.
    Status {
        #[arg(long, default_value = "127.0.0.1:50051")]
        endpoint: String,
        #[arg(long)]
        json: bool,
    },
    /// Drive a cluster or the in-process engine with a load; print throughput and latency as JSON.
    Bench(bench::Args),
    /// Draw sweeps written by `moectl bench --batch-sizes ... --json-out FILE` as one SVG:
    /// decode tokens/s and step time against batch size, with each run's floors.
    BenchPlot {
        /// Sweep JSON files, one line per file (legend: its target and weight dtype).
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Measure a GPU (bf16 matmul rate, memory bandwidth) and the grouped expert GEMM; JSON.
    GpuBench(gpu_bench::Args),
    /// Take a worker out of service without losing work, then let it leave. Presents the
    /// cluster token from `MOECTL_CLUSTER_TOKEN` when the cluster has one.
    Drain {
        #[arg(long, default_value = "127.0.0.1:50051")]
        endpoint: String,
        /// Worker id, as `moectl status` shows it.
        #[arg(long)]
        worker: String,
        /// Wait up to this many seconds for the worker to leave (0: do not wait).
        #[arg(long, default_value_t = 300)]
        wait_s: u64,
    },
    /// Fit the expert placement to the recent load (replicas for hot experts, even expected
    /// load per expert worker); the switch happens once the new slots are loaded. Presents the
    /// cluster token from `MOECTL_CLUSTER_TOKEN` when the cluster has one.
    Rebalance {
        #[arg(long, default_value = "127.0.0.1:50051")]
        endpoint: String,
        /// Plan even when the current placement is already balanced.
        #[arg(long)]
        force: bool,
        /// Wait up to this many seconds for the new placement to be active (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_s: u64,
    },
    /// Check a model against a golden fixture and print max |Δ| per quantity.
    CheckGolden(check_golden::Args),
    /// Write a seeded random Hunyuan-shaped model (HF layout) for tests and benchmarks.
    GenModel(gen_model::Args),
    /// Write a cluster CA and a node certificate for `--tls-cert/--tls-key/--tls-ca`.
    GenCerts(certs::Args),
    /// Run the coordinator (normally started by `moectl up` or a deployment).
    Coordinator(moe_coordinator::Args),
    /// Run an attention worker.
    AttentionWorker(moe_attention_worker::Args),
    /// Run an expert worker.
    ExpertWorker(moe_expert_worker::Args),
    /// Run the OpenAI-compatible HTTP front end before a cluster's coordinators.
    Frontend(moe_frontend::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Services log their life cycle; client commands only warnings, so their output stays clean.
    let default_level = match cli.command {
        Command::Up(_)
        | Command::Demo { .. }
        | Command::Coordinator(_)
        | Command::AttentionWorker(_)
        | Command::ExpertWorker(_)
        | Command::Frontend(_) => "info",
        _ => "warn",
    };
    moe_runtime::worker::init_tracing(default_level);
    // Client commands take their TLS from MOECTL_TLS_CA / _CERT / _KEY; services and `up`
    // from their flags.
    let serves = matches!(
        cli.command,
        Command::Up(_) | Command::Coordinator(_) | Command::AttentionWorker(_) | Command::ExpertWorker(_)
    );
    if serves || matches!(cli.command, Command::Demo { .. } | Command::Frontend(_)) {
        // Each connection served is a descriptor, and the bound on them follows this limit;
        // `up` and `demo` pass theirs on to the processes they start.
        moe_runtime::fdlimit::raise();
    }
    if !serves {
        match moe_runtime::tls::ClientTls::from_env() {
            Ok(Some(client)) => {
                let _ = moe_runtime::tls::install(moe_runtime::tls::Tls { server: None, client });
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
        // Operator commands (`drain`, `rebalance`) present the cluster token on the control plane.
        if let Ok(token) = std::env::var(moe_runtime::auth::CLUSTER_TOKEN_ENV)
            && let Err(e) = moe_runtime::auth::install_cluster_token(token)
        {
            eprintln!("error: {}: {e}", moe_runtime::auth::CLUSTER_TOKEN_ENV);
            return ExitCode::from(2);
        }
    }
    let result: anyhow::Result<ExitCode> = moe_runtime::worker::block_on(async {
        let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
        match cli.command {
            Command::Up(args) => ok(up::run(args).await),
            Command::Demo {
                cluster,
                prompt,
                max_tokens,
            } => ok(up::demo(cluster, prompt, max_tokens).await),
            Command::Generate(args) => ok(generate::run(args).await),
            Command::Chat(args) => ok(chat::run(args).await),
            Command::Status { endpoint, json } => ok(remote::status(&endpoint, json).await),
            Command::CheckGolden(args) => check_golden::run(args).await,
            Command::Bench(args) => ok(bench::run(args).await),
            Command::BenchPlot { files, out } => ok(bench::plot::run(&files, &out)),
            Command::GpuBench(args) => ok(gpu_bench::run(args)),
            Command::Drain {
                endpoint,
                worker,
                wait_s,
            } => {
                let wait = (wait_s > 0).then(|| std::time::Duration::from_secs(wait_s));
                ok(remote::drain(&endpoint, &worker, wait).await)
            }
            Command::Rebalance {
                endpoint,
                force,
                wait_s,
            } => {
                let wait = (wait_s > 0).then(|| std::time::Duration::from_secs(wait_s));
                ok(remote::rebalance(&endpoint, force, wait).await)
            }
            Command::GenModel(args) => ok(gen_model::run(args)),
            Command::GenCerts(args) => ok(certs::run(args)),
            Command::Coordinator(args) => ok(moe_coordinator::run(args).await.map_err(Into::into)),
            Command::AttentionWorker(args) => ok(moe_attention_worker::run(args).await.map_err(Into::into)),
            Command::ExpertWorker(args) => ok(moe_expert_worker::run(args).await.map_err(Into::into)),
            Command::Frontend(args) => ok(moe_frontend::run(args).await.map_err(Into::into)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
