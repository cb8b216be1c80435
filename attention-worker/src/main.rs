use clap::Parser;

#[derive(Parser)]
#[command(name = "attention-worker", version, about = "Hunyuan MoE attention worker")]
struct Cli {
    #[command(flatten)]
    args: moe_attention_worker::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    moe_attention_worker::run(Cli::parse().args).await?;
    Ok(())
}
