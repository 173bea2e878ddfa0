use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tidemark::cluster::ClusterHandle;
use tidemark::config::{Config, DEFAULT_CONFIG_PATH};
use tidemark::error::Error;
use tidemark::pipeline::keys::generate_master_key_file;
use tidemark::repo::walindex::WalSummary;

const EXIT_CODES: &str = "\
Exit codes:
   0  success
   1  not found (wal-fetch: the repository does not hold that file)
   2  usage or configuration error
   3  key error (key file missing, not mode 0600, or the wrong key)
   4  repository error (not initialised, another cluster's repository)
   5  integrity error (object corrupted, truncated or tampered with)
   6  store unavailable or failing after retries
   7  conflict (a different file is already archived under that name)
   8  PostgreSQL unreachable or failing
   9  invalid input (not a WAL file, missing input file)
  10  local I/O error
  70  internal error (a bug)

Environment: TIDEMARK_CONFIG, TIDEMARK_CLUSTER, TIDEMARK_LOG (a tracing filter, e.g. debug).";

/// PostgreSQL backup and point-in-time recovery: encrypted, compressed WAL archiving to a
/// local directory or S3-compatible storage.
#[derive(Parser, Debug)]
#[command(name = "tidemark", version, after_help = EXIT_CODES)]
struct Cli {
    /// Configuration file
    #[arg(long, global = true, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster to work on (a [clusters.NAME] section); optional when the config has only one
    #[arg(long, global = true, env = "TIDEMARK_CLUSTER", value_name = "NAME")]
    cluster: Option<String>,
    /// Log line format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Master key management
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Initialise the cluster's repository (records its system identifier, creates its keyring)
    #[command(
        long_about = "Initialise the cluster's repository: connects to PostgreSQL to read its \
system identifier, version and WAL segment size, creates a data key wrapped by the cluster's \
master key, and records both. Safe to re-run: an initialised repository of the same cluster \
is checked and left unchanged."
    )]
    Init {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Archive one WAL file (archive_command = 'tidemark ... wal-push %p')
    #[command(
        long_about = "Archive one WAL file: archive_command = 'tidemark --config FILE --cluster NAME wal-push %p'.\n\n\
Exits 0 only once the file is durably stored. A file already archived with identical content \
succeeds again; different content fails (exit 7) and never overwrites. Segments are checked \
against the repository's system identifier and segment size."
    )]
    WalPush {
        /// Path of the WAL file (%p), relative to the data directory or absolute
        path: PathBuf,
    },
    /// Restore one WAL file (restore_command = 'tidemark ... wal-fetch %f %p')
    #[command(
        long_about = "Restore one archived WAL file: restore_command = 'tidemark --config FILE --cluster NAME wal-fetch %f %p'.\n\n\
Writes DEST atomically after authenticating every byte. A file the repository does not hold \
exits 1 quietly (PostgreSQL asks for files that do not exist as part of recovery); any other \
failure is one error line and its own exit code."
    )]
    WalFetch {
        /// Name of the WAL file (%f)
        name: String,
        /// Where to write it (%p)
        dest: PathBuf,
    },
    /// Show archived WAL per timeline: first and last segment and every gap
    WalList {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Write a new random 32-byte master key to PATH (mode 0600; never overwrites)
    Generate { path: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::NotFound(msg)) => {
            // Expected during recovery: PostgreSQL probes for files beyond the archive's end.
            tracing::debug!("{msg}");
            ExitCode::from(1)
        }
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("tidemark: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_cluster(cli: &Cli) -> Result<ClusterHandle, Error> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let config = Config::load(&path)?;
    ClusterHandle::open(config, cli.cluster.as_deref()).await
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    println_out(&s)
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn println_out(s: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::LocalIo(format!("stdout: {e}"))),
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match &cli.command {
        Command::Key {
            command: KeyCommand::Generate { path },
        } => {
            let key = generate_master_key_file(path)?;
            println_out(&format!(
                "wrote master key {} (id {}, mode 0600): keep a copy in a safe place; \
                 without it the backups cannot be read",
                path.display(),
                key.id()
            ))
        }
        Command::Init { json } => {
            let cluster = open_cluster(&cli).await?;
            let out = tidemark::init::init(&cluster).await?;
            if *json {
                return print_json(&out);
            }
            println_out(&format!(
                "{} repository of cluster {} in {} (system identifier {}, PostgreSQL {}, {} MiB WAL segments)",
                if out.created {
                    "initialised"
                } else {
                    "already initialised:"
                },
                cluster.name,
                cluster.repo.store().describe(),
                out.system_identifier,
                out.pg_version_num,
                out.wal_segment_size >> 20
            ))
        }
        Command::WalPush { path } => {
            let cluster = open_cluster(&cli).await?;
            tidemark::wal::wal_push(&cluster, path).await.map(|_| ())
        }
        Command::WalFetch { name, dest } => {
            let cluster = open_cluster(&cli).await?;
            tidemark::wal::wal_fetch(&cluster, name, dest)
                .await
                .map(|_| ())
        }
        Command::WalList { json } => {
            let cluster = open_cluster(&cli).await?;
            let summary = tidemark::wal::wal_list(&cluster).await?;
            if *json {
                return print_json(&summary);
            }
            println_out(&render_wal_list(&cluster.name, &summary))
        }
    }
}

fn render_wal_list(cluster: &str, s: &WalSummary) -> String {
    let mut out = format!(
        "cluster {cluster}: {} MiB segments, {} timeline(s)\n",
        s.wal_segment_size >> 20,
        s.timelines.len()
    );
    for t in &s.timelines {
        out.push_str(&format!(
            "timeline {}: {} segment(s), first {}, last {}{}\n",
            t.timeline,
            t.segments,
            t.first.as_deref().unwrap_or("-"),
            t.last.as_deref().unwrap_or("-"),
            if t.history_file { ", history file" } else { "" }
        ));
        if t.gaps.is_empty() && t.segments > 0 {
            out.push_str("  no gaps\n");
        }
        for g in &t.gaps {
            out.push_str(&format!(
                "  GAP: {} .. {} ({} segment(s) missing)\n",
                g.from, g.to, g.missing
            ));
        }
        for p in &t.partial {
            out.push_str(&format!("  partial: {p}\n"));
        }
        for b in &t.backup_history_files {
            out.push_str(&format!("  backup history: {b}\n"));
        }
    }
    for u in &s.unrecognised {
        out.push_str(&format!("unrecognised object: {u}\n"));
    }
    out.trim_end().to_string()
}
