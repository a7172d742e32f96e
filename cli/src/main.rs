//! `talaria`: build, inspect and read accelerated artifacts of container images, on a
//! registry or in an OCI image layout directory.

mod cat;
mod common;
mod inspect;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use common::{CliError, Output};

const EXAMPLES: &str = "\
Examples:
  # Build the accelerated artifact of an image in an OCI layout (no registry needed)
  talaria build oci:./image:latest
  # Build for a registry image, storing the artifact in another repository
  talaria build registry.example.com/app/api:1.4 --artifact-repo registry.example.com/talaria/api
  # What artifacts exist, and which one a node would use
  talaria inspect oci:./image --output json
  # Read one file lazily through the artifact (stderr says how many bytes that fetched)
  talaria cat oci:./image /etc/passwd

IMAGE is `registry/repository[:tag|@digest]` or `oci:DIR[:TAG|@digest]`.
Exit codes: 0 ok, 1 error, 2 usage, 3 image or path not found, 4 no artifact.";

#[derive(Parser, Debug)]
#[command(name = "talaria", version, about = "Accelerated container image artifacts: build, inspect, cat", after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Output format of what a command prints on stdout.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Registry hosts (host[:port]) spoken to over plain HTTP; loopback hosts always are.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Docker config.json with registry credentials (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json).
    #[arg(
        long,
        global = true,
        env = "TALARIA_DOCKER_CONFIG",
        value_name = "PATH"
    )]
    pub docker_config: Option<std::path::PathBuf>,
    /// Platform of the image to use, os/arch[/variant] (default: this machine's).
    #[arg(long, global = true, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Where artifacts are stored when not next to the image: `registry/repository` or `oci:DIR`.
    #[arg(long, global = true, value_name = "REPO")]
    pub artifact_repo: Option<String>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `debug` or `talaria_artifact=trace`.
    #[arg(long, global = true, env = "TALARIA_LOG", default_value = "warn")]
    pub log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build (or adopt) the artifact of an image and store it next to the image (or in --artifact-repo).
    Build(BuildArgs),
    /// Show an image's platforms, layers and artifacts, and which artifact a node would use.
    Inspect {
        /// The image.
        image: String,
    },
    /// Print a file of the image, read lazily through its artifact.
    Cat {
        /// The image.
        image: String,
        /// Absolute path of the file inside the image (symlinks are followed within the image).
        path: String,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The image.
    pub image: String,
    /// `startup-local-v1` (indexes + startup plan) or `default` (indexes only).
    #[arg(long, value_enum, default_value_t = ProfileArg::StartupLocalV1)]
    pub profile: ProfileArg,
    /// Uncompressed bytes between decompression checkpoints (64 KiB to 64 MiB).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(65536..=67108864))]
    pub span_size: u64,
    /// Most bytes of startup data a node prefetches first.
    #[arg(long, default_value_t = 256 << 20)]
    pub prefetch_budget: u64,
    /// Layers smaller than this many compressed bytes are not indexed (pulled normally); 0 indexes all.
    #[arg(long, default_value_t = 0)]
    pub skip_smaller_than: u64,
    /// Layers indexed at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub parallelism: u64,
    /// Plan the reads of a recorded start instead of predicting them: a talaria-node's
    /// `/startup-trace` (JSON). The artifact replaces an existing one of the same key.
    #[arg(long, value_name = "FILE")]
    pub startup_trace: Option<std::path::PathBuf>,
    /// With --startup-trace: re-index the layers the start read with spans of this size
    /// there (uniform elsewhere), for nodes that fetch spans; 0 (default) keeps the indexes,
    /// since the startup pack carries the bytes read.
    #[arg(long, default_value_t = 0)]
    pub hot_span_size: u64,
    /// With --startup-trace: no startup pack (nodes fetch the plan's spans instead).
    #[arg(long)]
    pub no_pack: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileArg {
    #[value(name = "startup-local-v1")]
    StartupLocalV1,
    #[value(name = "default")]
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.global.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("talaria: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        match cli.command {
            Command::Build(args) => common::build(&cli.global, &args).await,
            Command::Inspect { image } => inspect::run(&cli.global, &image).await,
            Command::Cat { image, path } => cat::run(&cli.global, &image, &path).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("talaria: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}
