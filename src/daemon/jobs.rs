//! Jobs (backup, expire, drill) run as child processes of the daemon: `tidemark --config
//! <snapshot> --cluster NAME <command> --json`.
//!
//! Why processes: each job gets its memory back to the system when it ends (the daemon's stays
//! flat over months), a job's failure or crash cannot take the scheduler down, and a job
//! stops cleanly on SIGTERM exactly as when an operator runs it (a backup removes what it
//! wrote; a drill stops its server and removes its directory). The snapshot is the config the
//! daemon accepted last, so an edit that SIGHUP rejected never reaches a job. Children get
//! SIGTERM if the daemon dies (PR_SET_PDEATHSIG).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::error::Exit;

/// After SIGTERM, how long a job may take to stop before it is killed.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The code of a child that has none: killed by a signal, not started, or never run. No
/// `Exit` has it.
pub const NO_EXIT_CODE: i32 = -1;

/// Whether a child's exit code is `e`.
pub fn exited(code: i32, e: Exit) -> bool {
    code == i32::from(e.code())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Backup,
    Expire,
    Drill,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Expire => "expire",
            JobKind::Drill => "drill",
        }
    }
}

#[derive(Debug)]
pub struct JobResult {
    pub kind: JobKind,
    pub cluster: String,
    /// The child's exit code (NO_EXIT_CODE: killed by a signal or not started).
    pub code: i32,
    /// The child's `--json` output, when it printed one.
    pub json: Option<serde_json::Value>,
    /// The child's one-line error, when it failed.
    pub error: Option<String>,
    pub seconds: f64,
    /// Whether the daemon asked it to stop.
    pub cancelled: bool,
}

impl JobResult {
    pub fn ok(&self) -> bool {
        self.exited(Exit::Success)
    }

    pub fn exited(&self, e: Exit) -> bool {
        exited(self.code, e)
    }
}

pub struct JobSpec {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub cluster: String,
    pub kind: JobKind,
    pub args: Vec<String>,
}

/// Runs the job to its end. `cancel` asks it to stop (SIGTERM, then SIGKILL after
/// ABORT_TIMEOUT).
pub async fn run(spec: JobSpec, cancel: CancellationToken) -> JobResult {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&spec.exe);
    cmd.arg("--config")
        .arg(&spec.config)
        .arg("--cluster")
        .arg(&spec.cluster)
        .args(["--log-format", "json", spec.kind.as_str(), "--json"])
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: prctl(2) is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let fail = |error: String| JobResult {
        kind: spec.kind,
        cluster: spec.cluster.clone(),
        code: NO_EXIT_CODE,
        json: None,
        error: Some(error),
        seconds: started.elapsed().as_secs_f64(),
        cancelled: false,
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", spec.exe.display())),
    };
    let pid = child.id();
    tracing::info!(cluster = %spec.cluster, job = spec.kind.as_str(), pid, "job started");
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_end(&mut buf).await;
        }
        buf
    });
    let (cluster, kind) = (spec.cluster.clone(), spec.kind);
    let err_task = tokio::spawn(async move {
        let mut last_error = None;
        if let Some(s) = stderr {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(e) = forward_log(&cluster, kind, &line) {
                    last_error = Some(e);
                }
            }
        }
        last_error
    });
    let mut cancelled = false;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = cancel.cancelled() => {
            cancelled = true;
            if let Some(pid) = pid {
                tracing::info!(cluster = %spec.cluster, job = spec.kind.as_str(), pid, "asking the job to stop (SIGTERM)");
                // SAFETY: kill(2) on our own child's pid, which wait() has not reaped yet.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            match tokio::time::timeout(ABORT_TIMEOUT, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    tracing::error!(cluster = %spec.cluster, job = spec.kind.as_str(), "job did not stop within {ABORT_TIMEOUT:?}: killing it");
                    let _ = child.kill().await;
                    child.wait().await
                }
            }
        }
    };
    // A grandchild that inherited the pipes could keep them open after the job exited.
    let stdout = match tokio::time::timeout(Duration::from_secs(10), out_task).await {
        Ok(r) => r.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let last_error = match tokio::time::timeout(Duration::from_secs(10), err_task).await {
        Ok(r) => r.unwrap_or_default(),
        Err(_) => None,
    };
    let code = match &status {
        Ok(s) => s.code().unwrap_or(NO_EXIT_CODE),
        Err(_) => NO_EXIT_CODE,
    };
    let json = serde_json::from_slice(&stdout).ok();
    let error = if exited(code, Exit::Success) {
        None
    } else {
        Some(last_error.unwrap_or_else(|| match status {
            Ok(s) => format!("{} exited with {s}", spec.kind.as_str()),
            Err(e) => format!("{}: {e}", spec.kind.as_str()),
        }))
    };
    let r = JobResult {
        kind: spec.kind,
        cluster: spec.cluster,
        code,
        json,
        error,
        seconds: started.elapsed().as_secs_f64(),
        cancelled,
    };
    tracing::info!(cluster = %r.cluster, job = r.kind.as_str(), code = r.code, seconds = format!("{:.1}", r.seconds), "job finished");
    r
}

/// Re-logs one line of a child's stderr under the daemon's logger. Returns the child's final
/// error line (`tidemark: error: ...`), which is not JSON.
fn forward_log(cluster: &str, kind: JobKind, line: &str) -> Option<String> {
    let job = kind.as_str();
    if let Some(e) = line.strip_prefix("tidemark: error: ") {
        tracing::warn!(cluster, job, "{e}");
        return Some(e.to_string());
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        if !line.trim().is_empty() {
            tracing::info!(cluster, job, "{line}");
        }
        return None;
    };
    let fields = v.get("fields").and_then(|f| f.as_object());
    let message = fields
        .and_then(|f| f.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let extra: Vec<String> = fields
        .map(|f| {
            f.iter()
                .filter(|(k, _)| k.as_str() != "message")
                .map(|(k, v)| match v.as_str() {
                    Some(s) => format!("{k}={s}"),
                    None => format!("{k}={v}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let text = if extra.is_empty() {
        message.to_string()
    } else {
        format!("{message} ({})", extra.join(" "))
    };
    match v.get("level").and_then(|l| l.as_str()).unwrap_or("INFO") {
        "ERROR" => tracing::error!(cluster, job, "{text}"),
        "WARN" => tracing::warn!(cluster, job, "{text}"),
        "DEBUG" | "TRACE" => tracing::debug!(cluster, job, "{text}"),
        _ => tracing::info!(cluster, job, "{text}"),
    }
    None
}

/// Runs a read-only command (`list`, `drill --history`) as a child and returns its JSON:
/// reading a large catalog then costs the child's memory, which goes back to the system, not
/// the daemon's. Bounded by `timeout` (the child is killed).
pub async fn read_json(
    config: &Path,
    cluster: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<serde_json::Value, (i32, String)> {
    let mut cmd = tokio::process::Command::new(current_exe());
    cmd.arg("--config")
        .arg(config)
        .arg("--cluster")
        .arg(cluster)
        .args(args)
        .env("TIDEMARK_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => {
            return Err((
                NO_EXIT_CODE,
                format!("{} did not finish within {timeout:?}", args.join(" ")),
            ));
        }
        Ok(Err(e)) => return Err((NO_EXIT_CODE, format!("cannot run {}: {e}", args.join(" ")))),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("tidemark: error: "))
            .unwrap_or_else(|| err.lines().last().unwrap_or("failed"))
            .to_string();
        return Err((out.status.code().unwrap_or(NO_EXIT_CODE), line));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        (
            NO_EXIT_CODE,
            format!("{}: unreadable output: {e}", args.join(" ")),
        )
    })
}

/// The executable jobs run: this very binary.
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| Path::new("tidemark").to_path_buf())
}
