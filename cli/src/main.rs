//! `talaria`: build, inspect and read accelerated artifacts of container images, on a
//! registry or in an OCI image layout directory.

mod build;
mod cat;
mod common;
mod inspect;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
  # Sign artifacts as you build them; read only through signed ones
  talaria keygen ./talaria && talaria build oci:./image --sign-key ./talaria.key
  talaria cat oci:./image /etc/passwd --key ./talaria.pub

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
    /// Read through an artifact only if it carries a cosign-compatible signature by one of
    /// these public keys (PEM; `cosign public-key` or `talaria keygen` output), as a node
    /// trusting them would. Without it, `cat` and `inspect` trust the artifacts in the store.
    #[arg(long = "key", global = true, value_name = "FILE")]
    pub keys: Vec<std::path::PathBuf>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `debug` or `talaria_artifact=trace`.
    #[arg(long, global = true, env = "TALARIA_LOG", default_value = "warn")]
    pub log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build (or adopt) the artifact of an image and store it next to the image (or in --artifact-repo).
    Build(build::BuildArgs),
    /// Show an image's platforms, layers and artifacts, and which artifact a node would use.
    Inspect {
        /// The image.
        image: String,
    },
    /// Write a new ECDSA P-256 key pair for signing artifacts: PREFIX.key (private, PKCS#8)
    /// and PREFIX.pub (public; give it to nodes and to `cosign verify --key`).
    Keygen {
        /// Path prefix of the two files.
        prefix: std::path::PathBuf,
    },
    /// Print a file of the image, read lazily through its artifact.
    Cat {
        /// The image.
        image: String,
        /// Absolute path of the file inside the image (symlinks are followed within the image).
        path: String,
    },
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
            Command::Build(args) => build::run(&cli.global, &args).await,
            Command::Inspect { image } => inspect::run(&cli.global, &image).await,
            Command::Cat { image, path } => cat::run(&cli.global, &image, &path).await,
            Command::Keygen { prefix } => common::keygen(&prefix),
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
