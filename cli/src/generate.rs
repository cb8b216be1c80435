//! `moectl generate`: one request, in process or through a cluster (`remote`), printed as
//! comma-separated ids, with `--logprobs` as one JSON object per token, or with `--prompt` as
//! text.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moe_model::sampling::{GenerationRequest, SamplingParams, TokenLogprobs};
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
    /// such as `<|startoftext|>` becomes the special id; no chat template). Output: text
    /// (special tokens left out, characters never split), unless `--logprobs`.
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
    /// Divides a positive logit (multiplies a negative one) of every id already in the prompt
    /// or the output; 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted once from the logit of every id already generated, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every id already generated, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Print each token as a JSON line with its log-probability and its N most likely
    /// alternatives (0..=20) instead of the plain id list.
    #[arg(long, value_name = "N")]
    logprobs: Option<u32>,
}

/// Prints tokens as they come: ids separated by commas, JSON lines with log-probabilities, or
/// text.
pub struct TokenPrinter<'t> {
    printed: usize,
    json: bool,
    text: Option<moe_text::StreamDecoder<&'t moe_text::Tokenizer>>,
}

impl<'t> TokenPrinter<'t> {
    /// `tokenizer`: print text (ignored in JSON mode).
    pub fn new(json: bool, tokenizer: Option<&'t moe_text::Tokenizer>) -> Self {
        TokenPrinter {
            printed: 0,
            json,
            text: tokenizer
                .filter(|_| !json)
                .map(|t| moe_text::StreamDecoder::new(t, true)),
        }
    }

    /// Prints `tokens[self.printed..]` (with their log-probabilities in JSON mode).
    pub fn print_new(
        &mut self,
        out: &mut impl Write,
        tokens: &[u32],
        logprobs: &[TokenLogprobs],
    ) -> std::io::Result<()> {
        for (i, &id) in tokens.iter().enumerate().skip(self.printed) {
            if let Some(decoder) = &mut self.text {
                let text = decoder.push(id).map_err(std::io::Error::other)?;
                write!(out, "{text}")?;
            } else if self.json {
                let lp = logprobs.get(i);
                let line = serde_json::json!({
                    "index": i,
                    "id": id,
                    "logprob": lp.map(|l| l.logprob),
                    "top_logprobs": lp.map(|l| l.top.iter().map(|t| serde_json::json!({"id": t.id, "logprob": t.logprob})).collect::<Vec<_>>()),
                });
                writeln!(out, "{line}")?;
            } else {
                if i > 0 {
                    write!(out, ",")?;
                }
                write!(out, "{id}")?;
            }
        }
        self.printed = tokens.len();
        out.flush()
    }

    /// Ends the output (the rest of the text, the newline of the id list or text).
    pub fn finish(self, out: &mut impl Write) -> std::io::Result<()> {
        if let Some(decoder) = self.text {
            write!(out, "{}", decoder.finish())?;
        }
        if !self.json {
            writeln!(out)?;
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: args.stop_ids,
        max_tokens: args.max_tokens,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        logprobs: args.logprobs.is_some(),
        top_logprobs: args.logprobs.unwrap_or(0),
    };
    // The model directory is needed only to run in process or to tokenise `--prompt`: a request
    // of ids to a cluster must not build the built-in model on disk.
    if args.endpoint.is_some() && args.prompt.is_some() && args.model.is_none() {
        // The cluster's tokenizer is not known here; guessing the built-in one would send ids
        // of a different vocabulary without a word.
        anyhow::bail!("--prompt with --endpoint needs --model (the directory whose tokenizer the cluster serves)");
    }
    let model_dir = || -> anyhow::Result<PathBuf> {
        match &args.model {
            Some(d) => Ok(d.clone()),
            None => default_model_dir(),
        }
    };
    let (prompt, tokenizer) = match &args.prompt {
        None => (args.prompt_ids.clone(), None),
        Some(text) => {
            let dir = model_dir()?;
            let t =
                moe_text::Tokenizer::from_dir(&dir).with_context(|| format!("the tokenizer of {}", dir.display()))?;
            (t.encode(text)?, Some(t))
        }
    };
    let request = GenerationRequest::new(prompt, sampling);
    if let Some(endpoint) = &args.endpoint {
        return crate::remote::generate(endpoint, request, tokenizer.as_ref()).await;
    }
    let dir = model_dir()?;
    let started = Instant::now();
    let engine = Engine::load(&dir, EngineOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let loaded = started.elapsed();
    request.validate(engine.config())?;
    let mut printer = TokenPrinter::new(request.sampling.logprobs, tokenizer.as_ref());
    // The same scheduler an attention worker runs, with the experts in process.
    let scheduler = moe_attention_worker::scheduler::spawn(engine, Default::default());
    let started = Instant::now();
    let done = scheduler.run(request).await?;
    let elapsed = started.elapsed();
    let mut out = std::io::stdout().lock();
    printer.print_new(&mut out, &done.tokens, &done.logprobs)?;
    printer.finish(&mut out)?;
    let tokens = done.tokens;
    eprintln!(
        "{} tokens in {:.3} s ({:.1} tok/s; model loaded in {:.2} s)",
        tokens.len(),
        elapsed.as_secs_f64(),
        tokens.len() as f64 / elapsed.as_secs_f64(),
        loaded.as_secs_f64()
    );
    Ok(())
}
