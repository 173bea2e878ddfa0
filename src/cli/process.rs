//! What the process sets up around one command: allocator tuning, logging, and the signal
//! handling that lets a backup clean up after SIGTERM/SIGINT.

use std::io::IsTerminal;

use tidemark::error::Exit;

use super::args::LogFormat;

/// Keeps peak memory proportional to what is live. tidemark's large buffers (1 MiB chunks,
/// 8 MiB upload parts) are short-lived and allocated from many threads; glibc raises its mmap
/// threshold after each such buffer is freed, and then serves them from per-thread arenas that
/// keep the freed memory: measured 307 MiB peak for a --parallel 8 backup of incompressible
/// data. A fixed threshold returns every large buffer to the kernel on free, and fewer arenas
/// bound fragmentation.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Log lines go to stderr (stdout is the command's output), filtered by TIDEMARK_LOG.
pub fn init_logging(format: LogFormat) {
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

/// A token cancelled by the first SIGTERM or SIGINT; a second one ends the process at once
/// (exit 15): clean-up that waits on a store that is down can then be cut short, and what it
/// leaves is never listed (the next backup removes it).
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("signal received: stopping the backup and removing what it wrote");
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!(
            "tidemark: error: second signal: exiting now; the next backup removes what is left"
        );
        std::process::exit(i32::from(Exit::Interrupted.code()));
    });
    token
}
