use std::path::{Path, PathBuf};

use anyhow::Context;
use moe_model::DType;
use moe_model_tools::synthetic::{ModelShape, PRESETS, SynthOptions, available_memory_bytes, write_random_model};
use moe_text::synthetic::MIN_VOCAB;

#[derive(clap::Args)]
pub struct Args {
    /// Model shape: tiny (golden shapes), tiny-large (CLA, top-1), medium (the built-in default),
    /// a13b and large (the real shapes; refused where memory does not allow).
    #[arg(long, default_value = "medium", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype: f32, bf16, f16, or fp8 (static per-tensor FP8 e4m3 projections with
    /// scale = max|w|/448, embedding and norms bf16, router f32: Tencent's FP8 layout).
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Split weights into shards of at most this many MiB, with model.safetensors.index.json.
    #[arg(long)]
    shard_mib: Option<usize>,
    /// Copy this directory's tokenizer (`hy.tiktoken`, `tokenizer_config.json`) into the model
    /// instead of generating one; its ranks plus 11 specials must fit the model's vocabulary.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Only print the model's size and exit.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    shape: ShapeOverrides,
}

/// Changes to the preset's sizes, for models of other shapes.
#[derive(clap::Args, Default)]
pub struct ShapeOverrides {
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long)]
    head_dim: Option<usize>,
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long)]
    topk: Option<usize>,
    /// Expert and shared-MLP intermediate size.
    #[arg(long)]
    intermediate: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    /// Write a separate lm_head.weight instead of tying it to the embedding.
    #[arg(long)]
    untied: bool,
    /// Make expert popularity follow a Zipf law with this exponent (a per-layer router logit
    /// bias, `mlp.gate.wg.bias`; 0 = none), for load-balancing benchmarks.
    #[arg(long)]
    skew: Option<f64>,
}

impl ShapeOverrides {
    fn apply(&self, shape: &mut ModelShape) {
        let set = |dst: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut shape.layers, self.layers);
        set(&mut shape.hidden, self.hidden);
        set(&mut shape.heads, self.heads);
        set(&mut shape.kv_heads, self.kv_heads);
        set(&mut shape.head_dim, self.head_dim);
        set(&mut shape.experts, self.experts);
        set(&mut shape.topk, self.topk);
        set(&mut shape.intermediate, self.intermediate);
        set(&mut shape.vocab, self.vocab);
        if self.untied {
            shape.tie_embeddings = false;
        }
        if let Some(s) = self.skew {
            shape.router_skew = s;
        }
    }
}

/// Refuses a tokenizer whose ranks leave no room for the chat specials in `vocab` ids.
fn check_tokenizer_fits(dir: &Path, vocab: usize) -> anyhow::Result<()> {
    let ranks_path = dir.join(moe_text::tokenizer::RANKS_FILE);
    let n_ranks = moe_text::ranks::read_ranks(&ranks_path)?.len();
    let needed = n_ranks + moe_text::specials::MIN_SPECIALS;
    if needed > vocab {
        anyhow::bail!(
            "--tokenizer {}: its {n_ranks} ranks plus {} special tokens need a vocabulary of at least {needed}; the model has {vocab}",
            dir.display(),
            moe_text::specials::MIN_SPECIALS
        );
    }
    Ok(())
}

pub fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("`{s}` is not a dtype; use f32, bf16, f16 or fp8"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut shape = ModelShape::preset(&args.preset)?;
    args.shape.apply(&mut shape);
    let bytes = shape.size_in_bytes(args.dtype);
    if args.dry_run {
        println!(
            "{}",
            serde_json::json!({ "preset": args.preset, "dtype": args.dtype.hf_name(), "bytes": bytes })
        );
        return Ok(());
    }
    if args.shard_mib == Some(0) {
        anyhow::bail!("--shard-mib must be positive");
    }
    let options = SynthOptions {
        seed: args.seed,
        dtype: args.dtype,
        shard_bytes: args.shard_mib.map(|m| m << 20),
        max_bytes: available_memory_bytes(),
    };
    // Checked before the weights are written: a tokenizer that cannot serve this vocabulary
    // should not cost a model generation to find out.
    if let Some(from) = &args.tokenizer {
        check_tokenizer_fits(from, shape.vocab)?;
    }
    let mut files =
        write_random_model(&shape, &options, &args.out).with_context(|| format!("preset {}", args.preset))?;
    match &args.tokenizer {
        Some(from) => {
            let copied = moe_text::synthetic::copy_tokenizer(from, &args.out)?;
            files.retain(|f| !copied.contains(f));
            files.extend(copied);
        }
        None if shape.vocab < MIN_VOCAB => eprintln!(
            "note: no tokenizer written: a vocabulary of {} is below the {MIN_VOCAB} ids a byte-level tokenizer with the chat specials needs",
            shape.vocab
        ),
        None => {}
    }
    if shape.vocab >= MIN_VOCAB || args.tokenizer.is_some() {
        // What we write must be what we load.
        moe_text::Tokenizer::from_dir(&args.out).context("loading the model's tokenizer")?;
    }
    eprintln!(
        "wrote preset {} ({:.1} MB, {}) to {} ({} files)",
        args.preset,
        bytes as f64 / 1e6,
        args.dtype.hf_name(),
        args.out.display(),
        files.len()
    );
    Ok(())
}
