use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use moe_model::engine::Greedy;
use moe_model::kv_cache::{KvDtype, KvDtypeChoice};
use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_model::{Engine, EngineOptions};
use moe_model_tools::golden::{Fixture, GoldenTarget, PrefillResult, Tolerances};
use moe_runtime::client::ClusterClient;

#[derive(clap::Args)]
pub struct Args {
    /// Fixture directory (config.json, model.safetensors, expected.safetensors, cases.json).
    #[arg(long)]
    fixture: PathBuf,
    /// Check through a running cluster serving the fixture's model instead of in process.
    /// Per-layer traces are not exposed by the client API, so only logits and tokens are
    /// compared that way.
    #[arg(long)]
    endpoint: Option<String>,
    /// (In process only) Where the attention layers and routed experts run: cpu, or cuda:N in
    /// a `cuda` build. A GPU computes in bf16, so it is checked against the bf16 tolerances.
    #[arg(long, default_value = "cpu", conflicts_with = "endpoint")]
    device: String,
    /// The tolerances to check against: the fixture's own (`fixture`, the default on the CPU)
    /// or bf16 ones (`bf16`, the default on a GPU; for a cluster whose workers run on GPUs).
    #[arg(long, value_parser = ["fixture", "bf16"])]
    tolerances: Option<String>,
    /// (In process only) Element type of the KV cache: `f32` (the default: the fixtures'
    /// expectations are f32 arithmetic, which bf16 KV misses by more than their tolerances),
    /// `bf16` or `auto` (as `moectl up` would choose for the fixture's checkpoint).
    #[arg(long, default_value_t = KvDtypeChoice::Is(KvDtype::F32), conflicts_with = "endpoint")]
    kv_cache_dtype: KvDtypeChoice,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut fixture =
        Fixture::open(&args.fixture).with_context(|| format!("opening fixture {}", args.fixture.display()))?;
    let device = moe_model::device::Device::open(&args.device)?;
    let on_gpu = !matches!(device, moe_model::device::Device::Cpu);
    let tolerances = args
        .tolerances
        .as_deref()
        .unwrap_or(if on_gpu { "bf16" } else { "fixture" });
    if tolerances == "bf16" {
        fixture.tolerances = Tolerances::bf16();
        eprintln!("checking against bf16 tolerances: {:?}", fixture.tolerances);
    }
    let report = match &args.endpoint {
        None => {
            let options = EngineOptions {
                expert_device: device.clone(),
                attention_device: device,
                kv_cache: EngineOptions::default().kv_cache.with_dtype(args.kv_cache_dtype),
            };
            let mut engine = Engine::load(&args.fixture, options).context("loading the fixture's model")?;
            tokio::task::block_in_place(|| fixture.check(&mut engine))?
        }
        Some(endpoint) => {
            let mut target = ClusterTarget {
                client: ClusterClient::new(endpoint)?,
                handle: tokio::runtime::Handle::current(),
            };
            tokio::task::block_in_place(|| fixture.check(&mut target))?
        }
    };
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

/// A cluster reached through the client API: prompt logits, token logits and tokens.
struct ClusterTarget {
    client: ClusterClient,
    handle: tokio::runtime::Handle,
}

fn request(prompt: &[u32], max_tokens: u32, prompt_logits: bool, token_logits: bool) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams::greedy(max_tokens),
        return_prompt_logits: prompt_logits,
        return_token_logits: token_logits,
        resumed: 0,
    }
}

/// A failed call to the cluster: a failure of the target under check.
fn remote(e: tonic::Status) -> moe_model_tools::Error {
    moe_model_tools::Error::Target(format!("cluster: {e}"))
}

impl GoldenTarget for ClusterTarget {
    fn prefill(&mut self, prompt: &[u32]) -> moe_model_tools::Result<PrefillResult> {
        let g = self
            .handle
            .block_on(self.client.generate(&request(prompt, 1, true, false)))
            .map_err(remote)?;
        Ok(PrefillResult {
            logits: g.prompt_logits.unwrap_or_default(),
            trace: None,
            kv_states: None,
        })
    }

    fn prefill_batch(&mut self, prompts: &[Vec<u32>]) -> moe_model_tools::Result<Vec<Vec<f32>>> {
        let reqs: Vec<_> = prompts.iter().map(|p| request(p, 1, true, false)).collect();
        let out = self
            .handle
            .block_on(self.client.generate_batch(&reqs))
            .map_err(remote)?;
        Ok(out.into_iter().map(|g| g.prompt_logits.unwrap_or_default()).collect())
    }

    fn greedy(&mut self, prompts: &[Vec<u32>], steps: usize) -> moe_model_tools::Result<Vec<Greedy>> {
        let reqs: Vec<_> = prompts.iter().map(|p| request(p, steps as u32, false, true)).collect();
        let out = self
            .handle
            .block_on(self.client.generate_batch(&reqs))
            .map_err(remote)?;
        Ok(out
            .into_iter()
            .map(|g| Greedy {
                tokens: g.tokens,
                step_logits: g.token_logits,
            })
            .collect())
    }
}
