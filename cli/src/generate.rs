use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_model::{Engine, EngineOptions};

use crate::default_model::default_model_dir;

#[derive(clap::Args)]
pub struct Args {
    /// A running cluster's client endpoint (host:port). Without it, the single-process engine runs.
    #[arg(long)]
    endpoint: Option<String>,
    /// Model directory for the single-process engine, and the tokenizer of `--prompt`.
    /// Default: the built-in `medium` model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt as comma-separated token ids, e.g. 5,6,7. Output: token ids.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    prompt_ids: Vec<u32>,
    /// Prompt as text, tokenised with the model's tokenizer as written (special-token text
    /// such as `<|startoftext|>` becomes the special id; no chat template). Output: text.
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Stop after any of these token ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    stop_ids: Vec<u32>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: args.stop_ids,
        max_tokens: args.max_tokens,
    };
    let dir = match args.model {
        Some(d) => d,
        None => default_model_dir()?,
    };
    let (prompt, tokenizer) = match &args.prompt {
        None => (args.prompt_ids, None),
        Some(text) => {
            let t =
                moe_text::Tokenizer::from_dir(&dir).with_context(|| format!("the tokenizer of {}", dir.display()))?;
            (t.encode(text)?, Some(t))
        }
    };
    if let Some(endpoint) = &args.endpoint {
        return crate::remote::generate(endpoint, prompt, sampling, tokenizer.as_ref()).await;
    }
    let started = Instant::now();
    let engine = Engine::load(&dir, EngineOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let loaded = started.elapsed();
    let request = GenerationRequest {
        prompt,
        sampling,
        return_prompt_logits: false,
        return_token_logits: false,
        resumed: 0,
    };
    request.validate(engine.config())?;
    // The same scheduler an attention worker runs, with the experts in process.
    let scheduler = moe_attention_worker::scheduler::spawn(engine, Default::default());
    let started = Instant::now();
    let tokens = scheduler.run(request).await?.tokens;
    let elapsed = started.elapsed();
    match &tokenizer {
        Some(t) => println!("{}", t.decode(&tokens, true)?),
        None => println!("{}", tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
    }
    eprintln!(
        "{} tokens in {:.3} s ({:.1} tok/s; model loaded in {:.2} s)",
        tokens.len(),
        elapsed.as_secs_f64(),
        tokens.len() as f64 / elapsed.as_secs_f64(),
        loaded.as_secs_f64()
    );
    Ok(())
}
