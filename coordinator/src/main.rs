use clap::Parser;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "Hunyuan MoE cluster coordinator")]
struct Cli {
    #[command(flatten)]
    args: moe_coordinator::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    moe_coordinator::run(Cli::parse().args).await?;
    Ok(())
}
