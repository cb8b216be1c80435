use clap::Parser;

#[derive(Parser)]
#[command(name = "expert-worker", version, about = "Hunyuan MoE expert worker")]
struct Cli {
    #[command(flatten)]
    args: moe_expert_worker::Args,
}

fn main() -> anyhow::Result<()> {
    moe_runtime::worker::init_tracing("info");
    // Each connection served is a descriptor; the bound on them follows this limit.
    moe_runtime::fdlimit::raise();
    moe_runtime::worker::block_on(moe_expert_worker::run(Cli::parse().args))?;
    Ok(())
}
