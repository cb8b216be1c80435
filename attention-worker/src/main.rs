use clap::Parser;

#[derive(Parser)]
#[command(name = "attention-worker", version, about = "Hunyuan MoE attention worker")]
struct Cli {
    #[command(flatten)]
    args: moe_attention_worker::Args,
}

fn main() -> anyhow::Result<()> {
    moe_runtime::worker::init_tracing("info");
    // Each connection served is a descriptor; the bound on them follows this limit.
    moe_runtime::fdlimit::raise();
    moe_runtime::worker::block_on(moe_attention_worker::run(Cli::parse().args))?;
    Ok(())
}
