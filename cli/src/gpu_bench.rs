//! `moectl gpu-bench`: the GPU's measured limits (bf16 matmul rate, memory bandwidth) beside
//! the expert worker's grouped expert GEMM at a dispatch's shape, as JSON, so the expert rate
//! reads as a fraction of the card's own matmul rate and a dispatch's time against the time to
//! read its weights once (the decode floor).

use anyhow::{Context, bail};
use moe_model::device::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GPU to measure (`cuda:N`; needs a `cuda` build).
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Experts in one dispatch (the A13B default: 64 experts over 8 expert workers).
    #[arg(long, default_value_t = 8, value_parser = crate::flags::positive::<usize>())]
    pub experts: usize,
    /// Token rows per expert, one value or several, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512", value_parser = crate::flags::positive::<usize>())]
    pub rows: Vec<usize>,
    /// Hidden size (A13B: 4096).
    #[arg(long, default_value_t = 4096, value_parser = crate::flags::positive::<usize>())]
    pub hidden: usize,
    /// Expert intermediate size (A13B: 3072).
    #[arg(long, default_value_t = 3072, value_parser = crate::flags::positive::<usize>())]
    pub inter: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let gpu = match Device::open(&args.device)? {
        Device::Cuda(gpu) => gpu,
        Device::Cpu => bail!("gpu-bench measures a GPU: use --device cuda:N"),
    };
    let matmul = gpu
        .measure_bf16_matmul_tflops(8192, args.iters)
        .context("measuring the bf16 matmul rate")?;
    let memory = gpu
        .measure_memory_gbps(1 << 30, args.iters)
        .context("measuring memory bandwidth")?;
    let weight_bytes = (3 * 2 * args.experts * args.hidden * args.inter) as f64;
    let mut runs = Vec::new();
    for &rows in &args.rows {
        let (tflops, secs) = gpu
            .measure_grouped_experts(args.experts, rows, args.hidden, args.inter, args.iters)
            .with_context(|| format!("measuring grouped expert GEMMs of {rows} rows"))?;
        let floor = weight_bytes / (memory * 1e9);
        runs.push(serde_json::json!({
            "rows_per_expert": rows,
            "tflops": tflops,
            "fraction_of_matmul": tflops / matmul,
            "ms_per_dispatch": secs * 1e3,
            "weight_read_floor_ms": floor * 1e3,
            "ratio_to_floor": secs / floor,
        }));
    }
    let report = serde_json::json!({
        "device": format!("{:?}", Device::Cuda(gpu)),
        "limits": { "bf16_matmul_8192_tflops": matmul, "memory_copy_gbps": memory },
        "grouped_experts": {
            "experts": args.experts, "hidden": args.hidden, "inter": args.inter,
            "weight_bytes": weight_bytes, "runs": runs,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
