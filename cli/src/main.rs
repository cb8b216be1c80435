//! `moectl`: the operator and client CLI of the Hunyuan MoE cluster.

mod check_golden;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "moectl", version, about = "Operate and use a Hunyuan MoE expert-parallel cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a model against a golden fixture and print max |Δ| per quantity.
    CheckGolden(check_golden::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckGolden(args) => check_golden::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
