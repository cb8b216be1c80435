use clap::Parser;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "Hunyuan MoE cluster coordinator")]
struct Cli {
    #[command(flatten)]
    args: moe_coordinator::Args,
}

fn main() -> anyhow::Result<()> {
    moe_runtime::worker::init_tracing("info");
    moe_runtime::worker::block_on(moe_coordinator::run(Cli::parse().args))?;
    Ok(())
}
