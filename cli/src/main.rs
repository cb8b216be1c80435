//! `moectl`: the operator and client CLI of the Hunyuan MoE cluster.

mod check_golden;
mod default_model;
mod gen_model;
mod generate;

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
    /// Check a model against a golden fixture and print max |Δ| per quantity.
    CheckGolden(check_golden::Args),
    /// Write a seeded random Hunyuan-shaped model (HF layout) for tests and benchmarks.
    GenModel(gen_model::Args),
    /// Greedy generation on the single-process engine.
    Generate(generate::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckGolden(args) => check_golden::run(args),
        Command::GenModel(args) => gen_model::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Generate(args) => generate::run(args).map(|()| std::process::ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
