use clap::Parser;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "Hunyuan MoE cluster coordinator")]
struct Cli {
    #[command(flatten)]
    args: moe_coordinator::Args,
}

fn main() -> anyhow::Result<()> {
    moe_runtime::worker::init_tracing("info");
    // Each connection served is a descriptor; the bound on them follows this limit.
    moe_runtime::fdlimit::raise();
    moe_runtime::worker::block_on(moe_coordinator::run(Cli::parse().args))?;
    Ok(())
}
