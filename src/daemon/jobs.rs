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

use crate::backup::BackupOutcome;
use crate::drill::DrillRecord;
use crate::error::Exit;
use crate::expire::ExpireOutcome;

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

    /// Reads the job's `--json` output as the type its command prints.
    fn parse_output(self, stdout: &[u8]) -> Result<JobOutput, serde_json::Error> {
        Ok(match self {
            JobKind::Backup => JobOutput::Backup(serde_json::from_slice(stdout)?),
            JobKind::Expire => JobOutput::Expire(serde_json::from_slice(stdout)?),
            JobKind::Drill => JobOutput::Drill(serde_json::from_slice(stdout)?),
        })
    }
}

/// What a job printed with `--json`: its command's own result type.
#[derive(Debug)]
pub enum JobOutput {
    Backup(Box<BackupOutcome>),
    Expire(Box<ExpireOutcome>),
    /// Printed by a failed drill too (exit DrillFailed), with its reason.
    Drill(Box<DrillRecord>),
}

#[derive(Debug)]
pub struct JobResult {
    pub kind: JobKind,
    pub cluster: String,
    /// The child's exit code (NO_EXIT_CODE: killed by a signal or not started).
    pub code: i32,
    /// The child's `--json` output, when it printed one that parses.
    pub output: Option<JobOutput>,
    /// The child's one-line error, when it failed; also set for a child that exited 0 without
    /// a readable result (a failure too: the daemon cannot know what it did).
    pub error: Option<String>,
    pub seconds: f64,
    /// Whether the daemon asked it to stop.
    pub cancelled: bool,
}

impl JobResult {
    pub fn ok(&self) -> bool {
        self.exited(Exit::Success) && self.error.is_none()
    }

    /// Stopped by the daemon's shutdown (asked to, or never started). A child that exited 0
    /// anyway finished: not this, even when its result was unreadable.
    pub fn stopped(&self) -> bool {
        self.cancelled && !self.exited(Exit::Success)
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
    let fail = |error: String| JobResult {
        kind: spec.kind,
        cluster: spec.cluster.clone(),
        code: NO_EXIT_CODE,
        output: None,
        error: Some(error),
        seconds: started.elapsed().as_secs_f64(),
        cancelled: false,
    };
    let mut child = match command(&spec).spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", spec.exe.display())),
    };
    let pid = child.id();
    tracing::info!(cluster = %spec.cluster, job = spec.kind.as_str(), pid, "job started");
    let stdout = child.stdout.take();
    let out_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_end(&mut buf).await;
        }
        buf
    });
    let err_task = tokio::spawn(forward_stderr(
        child.stderr.take(),
        spec.cluster.clone(),
        spec.kind,
    ));
    let (status, cancelled) = wait_or_stop(&mut child, &spec, &cancel).await;
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
    let (output, error) = read_output(&spec, code, &stdout);
    let error = if exited(code, Exit::Success) {
        error
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
        output,
        error,
        seconds: started.elapsed().as_secs_f64(),
        cancelled,
    };
    tracing::info!(cluster = %r.cluster, job = r.kind.as_str(), code = r.code, seconds = format!("{:.1}", r.seconds), "job finished");
    r
}

/// `tidemark --config <snapshot> --cluster NAME --log-format json <command> --json ARGS`,
/// SIGTERM'd if the daemon dies.
fn command(spec: &JobSpec) -> tokio::process::Command {
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
    cmd
}

/// Re-logs the child's stderr under the daemon's logger; returns its last error line.
async fn forward_stderr(
    stderr: Option<tokio::process::ChildStderr>,
    cluster: String,
    kind: JobKind,
) -> Option<String> {
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
}

/// Waits for the child to exit; when `cancel` fires first, SIGTERM, then SIGKILL after
/// ABORT_TIMEOUT. Returns its status and whether it was asked to stop.
async fn wait_or_stop(
    child: &mut tokio::process::Child,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> (std::io::Result<std::process::ExitStatus>, bool) {
    let pid = child.id();
    tokio::select! {
        s = child.wait() => (s, false),
        _ = cancel.cancelled() => {
            if let Some(pid) = pid {
                tracing::info!(cluster = %spec.cluster, job = spec.kind.as_str(), pid, "asking the job to stop (SIGTERM)");
                // SAFETY: kill(2) on our own child's pid, which wait() has not reaped yet.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let s = match tokio::time::timeout(ABORT_TIMEOUT, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    tracing::error!(cluster = %spec.cluster, job = spec.kind.as_str(), "job did not stop within {ABORT_TIMEOUT:?}: killing it");
                    let _ = child.kill().await;
                    child.wait().await
                }
            };
            (s, true)
        }
    }
}

/// The job's typed result, and for a child that exited 0 without one the error that makes it
/// a failure. A failed child's unreadable output is only logged: its own error says more.
fn read_output(spec: &JobSpec, code: i32, stdout: &[u8]) -> (Option<JobOutput>, Option<String>) {
    let job = spec.kind.as_str();
    let printed = !stdout.iter().all(u8::is_ascii_whitespace);
    let parsed = printed.then(|| spec.kind.parse_output(stdout));
    if exited(code, Exit::Success) {
        match parsed {
            Some(Ok(o)) => (Some(o), None),
            Some(Err(e)) => (
                None,
                Some(format!(
                    "{job} exited 0 but its --json result does not parse: {e}"
                )),
            ),
            None => (
                None,
                Some(format!("{job} exited 0 but printed no --json result")),
            ),
        }
    } else {
        match parsed {
            Some(Ok(o)) => (Some(o), None),
            Some(Err(e)) => {
                tracing::warn!(cluster = %spec.cluster, job, "the failed job's --json result does not parse: {e}");
                (None, None)
            }
            None => (None, None),
        }
    }
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

/// A read-only child that failed, or whose output does not parse.
#[derive(Debug)]
pub struct ChildFailure {
    /// Its exit code (NO_EXIT_CODE: it did not run, did not finish, or printed nonsense).
    pub code: i32,
    /// Its one-line error.
    pub message: String,
}

impl ChildFailure {
    fn new(code: i32, message: String) -> ChildFailure {
        ChildFailure { code, message }
    }
}

/// Runs a read-only command (`list`, `drill --history`) as a child and reads its JSON as `T`,
/// the type the command prints: reading a large catalog then costs the child's memory, which
/// goes back to the system, not the daemon's. Bounded by `timeout` (the child is killed).
pub async fn read_json<T: serde::de::DeserializeOwned>(
    config: &Path,
    cluster: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<T, ChildFailure> {
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
            return Err(ChildFailure::new(
                NO_EXIT_CODE,
                format!("{} did not finish within {timeout:?}", args.join(" ")),
            ));
        }
        Ok(Err(e)) => {
            return Err(ChildFailure::new(
                NO_EXIT_CODE,
                format!("cannot run {}: {e}", args.join(" ")),
            ));
        }
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
        return Err(ChildFailure::new(
            out.status.code().unwrap_or(NO_EXIT_CODE),
            line,
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        ChildFailure::new(
            NO_EXIT_CODE,
            format!("{}: unreadable output: {e}", args.join(" ")),
        )
    })
}

/// The executable jobs run: this very binary.
pub fn current_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| Path::new("tidemark").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: JobKind) -> JobSpec {
        JobSpec {
            exe: PathBuf::from("tidemark"),
            config: PathBuf::from("/etc/tidemark.toml"),
            cluster: "acme".into(),
            kind,
            args: Vec::new(),
        }
    }

    fn backup_json() -> Vec<u8> {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-01T02:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        serde_json::to_vec_pretty(&BackupOutcome {
            id: "20261201T020000Z".into(),
            label: "daily".into(),
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            start_time: t,
            stop_time: t + chrono::Duration::seconds(7),
            files: 1000,
            packs: 2,
            original_bytes: 30 << 20,
            stored_bytes: 4 << 20,
            duration_ms: 7250,
            removed_incomplete: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn a_job_result_is_read_as_its_commands_type() {
        let ok = i32::from(Exit::Success.code());
        let (out, err) = read_output(&spec(JobKind::Backup), ok, &backup_json());
        assert!(err.is_none(), "{err:?}");
        match out {
            Some(JobOutput::Backup(b)) => {
                assert_eq!(b.duration_ms, 7250);
                assert_eq!(b.stored_bytes, 4 << 20);
            }
            other => panic!("{other:?}"),
        }
        // Another command's JSON is not a backup's result.
        let (out, err) = read_output(&spec(JobKind::Expire), ok, &backup_json());
        assert!(out.is_none());
        let err = err.unwrap();
        assert!(
            err.starts_with("expire exited 0 but its --json result does not parse: "),
            "{err}"
        );
    }

    // A child that exited 0 with nothing readable is a failure, never a success of zeros.
    #[test]
    fn a_successful_job_without_a_readable_result_is_a_failure() {
        let ok = i32::from(Exit::Success.code());
        for (stdout, want) in [
            (&b"{\"deleted_backups\": 1"[..], "does not parse"),
            (&b"\n"[..], "printed no --json result"),
        ] {
            let (out, err) = read_output(&spec(JobKind::Expire), ok, stdout);
            assert!(out.is_none());
            assert!(err.as_deref().unwrap_or("").contains(want), "{err:?}");
        }
        let r = JobResult {
            kind: JobKind::Expire,
            cluster: "acme".into(),
            code: ok,
            output: None,
            error: Some("expire exited 0 but printed no --json result".into()),
            seconds: 1.0,
            cancelled: true,
        };
        assert!(!r.ok());
        assert!(!r.stopped(), "it finished: not stopped by the shutdown");
    }

    #[test]
    fn a_failed_job_keeps_its_own_error() {
        // A failed backup prints nothing; its stderr's error line is the reason (set by run).
        let store = i32::from(Exit::Store.code());
        let (out, err) = read_output(&spec(JobKind::Backup), store, b"");
        assert!(out.is_none() && err.is_none());
        let (out, err) = read_output(&spec(JobKind::Backup), store, b"garbage");
        assert!(out.is_none() && err.is_none());
    }
}
