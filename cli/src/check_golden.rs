use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use moe_model::golden::Fixture;
use moe_model::{Engine, EngineOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Fixture directory (config.json, model.safetensors, expected.safetensors, cases.json).
    #[arg(long)]
    fixture: PathBuf,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let fixture =
        Fixture::open(&args.fixture).with_context(|| format!("opening fixture {}", args.fixture.display()))?;
    let mut engine = Engine::load(&args.fixture, EngineOptions::default()).context("loading the fixture's model")?;
    let report = fixture.check(&mut engine)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
