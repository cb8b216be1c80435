use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moe_model::{Engine, EngineOptions};

use crate::default_model::default_model_dir;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (HF layout). Default: the built-in `medium` model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt as comma-separated token ids, e.g. 5,6,7.
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Stop after any of these token ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    stop_ids: Vec<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let dir = match args.model {
        Some(d) => d,
        None => default_model_dir()?,
    };
    let started = Instant::now();
    let mut engine =
        Engine::load(&dir, EngineOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let loaded = started.elapsed();
    let started = Instant::now();
    let out = engine.generate_greedy(
        std::slice::from_ref(&args.prompt_ids),
        args.max_tokens,
        &args.stop_ids,
        false,
    )?;
    let elapsed = started.elapsed();
    let tokens = &out[0].tokens;
    println!("{}", tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    eprintln!(
        "{} tokens in {:.3} s ({:.1} tok/s; model loaded in {:.2} s)",
        tokens.len(),
        elapsed.as_secs_f64(),
        tokens.len() as f64 / elapsed.as_secs_f64(),
        loaded.as_secs_f64()
    );
    Ok(())
}
