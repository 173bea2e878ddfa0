//! The command line: parses the arguments (`args`), runs one command (`commands`), prints its
//! outcome (`render`) and turns errors into the documented exit codes (`error::Exit`).
//! Process set-up (allocator, logging, signals) is in `process`.

mod args;
mod commands;
mod process;
mod render;

use std::process::ExitCode;

use clap::Parser;
use tidemark::error::{Error, Exit};

use args::{Cli, Command, KeyCommand};

/// wal-fetch's exit status for every failure but "not in the repository" (see main).
const WAL_FETCH_FAILED: u8 = Exit::WalFetchFailed.code();

pub fn main() -> ExitCode {
    process::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    process::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark: cannot start the runtime: {e}");
            return ExitCode::from(Exit::Internal.code());
        }
    };
    let wal_fetch = matches!(cli.command, Command::WalFetch(_));
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::CheckStatus(code)) => ExitCode::from(code),
        Err(Error::NotFound(msg)) => {
            // Expected during recovery: PostgreSQL probes for files beyond the archive's end.
            tracing::debug!("{msg}");
            ExitCode::from(Exit::NotFound.code())
        }
        Err(e) if wal_fetch => {
            // PostgreSQL takes any exit status up to 125 from restore_command as "no more WAL"
            // and ends recovery there, promoting a cluster that misses the rest. A file that
            // exists but cannot be fetched (store down, wrong key, corruption) must stop
            // recovery instead: an exit status above 125 makes PostgreSQL abort it.
            tracing::debug!(error = ?e, "wal-fetch failed");
            eprintln!(
                "tidemark: error: {e} (exit {WAL_FETCH_FAILED} instead of {}: PostgreSQL stops recovery here rather than ending it early)",
                e.exit_code()
            );
            ExitCode::from(WAL_FETCH_FAILED)
        }
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("tidemark: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// One command: its function in `commands` does the work and the printing.
async fn run(cli: &Cli) -> Result<(), Error> {
    use commands::*;
    match &cli.command {
        Command::Key {
            command: KeyCommand::Generate { path },
        } => cmd_key_generate(path),
        Command::Init(a) => cmd_init(cli, a).await,
        Command::WalPush(a) => cmd_wal_push(cli, a).await,
        Command::WalFetch(a) => cmd_wal_fetch(cli, a).await,
        Command::WalList(a) => cmd_wal_list(cli, a).await,
        Command::Backup(a) => cmd_backup(cli, a).await,
        Command::Drill(a) => cmd_drill(cli, a).await,
        Command::Check(a) => cmd_check(cli, a).await,
        Command::Expire(a) => cmd_expire(cli, a).await,
        Command::List(a) => cmd_list(cli, a).await,
        Command::Restore(a) => cmd_restore(cli, a).await,
        Command::Daemon => cmd_daemon(cli).await,
        Command::Audit(a) => cmd_audit(cli, a).await,
    }
}
