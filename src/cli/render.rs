//! Every text the command line prints: one function per command's outcome, returning the text
//! (stdout gets it whole, so a renderer is a pure function of the outcome), and the writers
//! that put it or the JSON form on stdout. Operators parse some of these lines: keep them
//! byte-for-byte unless a change is meant.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tidemark::audit::{Listed, VerifyReport};
use tidemark::backup::BackupOutcome;
use tidemark::check::{CheckReport, Status};
use tidemark::drill::DrillRecord;
use tidemark::error::Error;
use tidemark::expire::ExpireOutcome;
use tidemark::init::InitOutcome;
use tidemark::list::Listing;
use tidemark::repo::walindex::WalSummary;
use tidemark::restore::RestoreOutcome;

/// Prints `v` as pretty JSON (the `--json` form of every command).
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    println_out(&s)
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
pub fn println_out(s: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::LocalIo(format!("stdout: {e}"))),
    }
}

pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Milliseconds as seconds with one decimal, `-` when not measured.
fn seconds_or_dash(ms: Option<u64>) -> String {
    ms.map(|m| format!("{:.1} s", m as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

pub fn render_key_generated(path: &Path, key_id: &str) -> String {
    format!(
        "wrote master key {} (id {key_id}, mode 0600): keep a copy in a safe place; \
         without it the backups cannot be read",
        path.display(),
    )
}

pub fn render_init(out: &InitOutcome, cluster: &str, store: &str) -> String {
    format!(
        "{} repository of cluster {cluster} in {store} (system identifier {}, PostgreSQL {}, {} MiB WAL segments)",
        if out.created {
            "initialised"
        } else {
            "already initialised:"
        },
        out.system_identifier,
        out.pg_version_num,
        out.wal_segment_size >> 20
    )
}

pub fn render_backup(out: &BackupOutcome, cluster: &str) -> String {
    format!(
        "backup {} of cluster {cluster} complete: {} files, {} -> {} stored, {:.1} s; \
         timeline {}, LSN {} .. {}; restorable from {}",
        out.id,
        out.files,
        human_bytes(out.original_bytes),
        human_bytes(out.stored_bytes),
        out.duration_ms as f64 / 1000.0,
        out.timeline,
        out.start_lsn,
        out.stop_lsn,
        out.stop_time.format("%Y-%m-%d %H:%M:%S%.3f+00")
    )
}

pub fn render_drill_history(cluster: &str, history: &[DrillRecord]) -> String {
    let mut text = format!("cluster {cluster}: {} drill(s)", history.len());
    for r in history {
        text.push_str(&format!(
            "\n{} {} {:<4} target {}; backup {}; RTO {}; {}",
            r.id,
            r.started.format("%Y-%m-%d %H:%M:%S+00"),
            if r.ok { "OK" } else { "FAIL" },
            r.target,
            r.backup.as_deref().unwrap_or("-"),
            seconds_or_dash(r.rto_ms),
            r.error.as_deref().unwrap_or("all checks passed")
        ));
    }
    text
}

pub fn render_drill(r: &DrillRecord) -> String {
    let mut text = format!(
        "drill {} of cluster {}: {} — target {}, backup {}, recovered to {} (LSN {}); \
         RTO {} (download {}, recovery {}), {} restored, {} WAL segment(s) replayed",
        r.id,
        r.cluster,
        if r.ok { "PASSED" } else { "FAILED" },
        r.target,
        r.backup.as_deref().unwrap_or("-"),
        r.restored_to_time
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
            .unwrap_or_else(|| "-".into()),
        r.restored_to_lsn.as_deref().unwrap_or("-"),
        seconds_or_dash(r.rto_ms),
        seconds_or_dash(r.download_ms),
        seconds_or_dash(r.recovery_ms),
        r.bytes_restored
            .map(human_bytes)
            .unwrap_or_else(|| "-".into()),
        r.wal_segments_replayed
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    for c in &r.checks {
        text.push_str(&format!(
            "\n{:<4} {:<8} {}",
            if c.ok { "OK" } else { "FAIL" },
            c.name,
            c.detail
        ));
    }
    for o in &r.overrides {
        if o.starts_with("configuration:") {
            text.push_str(&format!("\nwarning: {o}"));
        } else {
            text.push_str(&format!("\nstarted with {o}"));
        }
    }
    if let Some(e) = &r.error {
        text.push_str(&format!("\nreason: {e}"));
    }
    if let Some(l) = &r.server_log {
        text.push_str(&format!("\nserver log kept: {l}"));
    }
    text
}

/// The Nagios-style status line, then one line per check.
pub fn render_check(report: &CheckReport) -> String {
    let worst: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == report.status && report.status != Status::Ok)
        .map(|c| c.name)
        .collect();
    let mut text = format!(
        "TIDEMARK {} - cluster {}: {}",
        report.status.label(),
        report.cluster,
        if worst.is_empty() {
            format!("{} checks passed", report.checks.len())
        } else {
            worst.join(", ")
        }
    );
    for c in &report.checks {
        text.push_str(&format!(
            "\n{:<8} {:<16} {}",
            c.status.label(),
            c.name,
            c.message
        ));
    }
    text
}

/// `check` when the cluster cannot even be opened (a broken config is critical to monitoring).
pub fn render_check_unopened(e: &Error) -> String {
    format!("TIDEMARK CRITICAL - {e}")
}

pub fn render_expire(outcome: &ExpireOutcome) -> String {
    let p = &outcome.plan;
    let verb = if outcome.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let mut text = format!(
        "cluster {}: recovery window {} (from {}), min_backups {}\nkeep {} backup(s): {}\n{verb} {} backup(s): {}\n{verb} {} WAL file(s), {}{}",
        p.cluster,
        humantime::format_duration(Duration::from_secs(p.recovery_window_secs)),
        p.window_start.format("%Y-%m-%d %H:%M:%S+00"),
        p.min_backups,
        p.keep_backups.len(),
        p.keep_backups.join(", "),
        p.delete_backups.len(),
        if p.delete_backups.is_empty() {
            "-".to_string()
        } else {
            p.delete_backups.join(", ")
        },
        p.delete_wal.len(),
        human_bytes(p.delete_wal_bytes),
        p.wal_keep_from
            .as_ref()
            .map(|s| format!(" (WAL kept from {s})"))
            .unwrap_or_default()
    );
    for n in &p.notes {
        text.push_str(&format!("\nnote: {n}"));
    }
    if !outcome.removed_incomplete.is_empty() {
        text.push_str(&format!(
            "\nremoved leftovers of incomplete backups: {}",
            outcome.removed_incomplete.join(", ")
        ));
    }
    if outcome.dry_run {
        for k in &p.delete_wal {
            text.push_str(&format!("\n  {k}"));
        }
    }
    text
}

pub fn render_list(l: &Listing) -> String {
    let ts = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S+00").to_string();
    let mut out = format!(
        "cluster {}: {} complete backup(s)\n",
        l.cluster,
        l.backups.len()
    );
    if !l.backups.is_empty() {
        out.push_str(&format!(
            "{:<20} {:>3} {:<22} {:<22} {:<12} {:<12} {:>10} {:>10} {:>8} {:>6} {:>5}\n",
            "ID",
            "TLI",
            "START",
            "STOP",
            "START LSN",
            "STOP LSN",
            "ORIGINAL",
            "STORED",
            "SECONDS",
            "PG",
            "CONF"
        ));
    }
    for b in &l.backups {
        out.push_str(&format!(
            "{:<20} {:>3} {:<22} {:<22} {:<12} {:<12} {:>10} {:>10} {:>8.1} {:>6} {:>5}{}\n",
            b.id,
            b.timeline,
            ts(&b.start_time),
            ts(&b.stop_time),
            b.start_lsn,
            b.stop_lsn,
            human_bytes(b.original_bytes),
            human_bytes(b.stored_bytes),
            b.duration_ms as f64 / 1000.0,
            b.pg_version_num / 10000,
            // Configuration files from outside the data directory held; "?": not recorded.
            match &b.configuration {
                None => "?".to_string(),
                Some(c) if !c.missing.is_empty() => format!("{}!", c.captured.len()),
                Some(c) => c.captured.len().to_string(),
            },
            if b.range.restorable {
                ""
            } else {
                "  NOT RESTORABLE (WAL missing)"
            }
        ));
    }
    if l.backups.iter().any(|b| b.configuration.is_none()) {
        out.push_str(
            "CONF ?: the backup does not record the configuration kept outside the data directory\n",
        );
    }
    if l.backups.iter().any(|b| {
        b.configuration
            .as_ref()
            .is_some_and(|c| !c.missing.is_empty())
    }) {
        out.push_str("CONF N!: some configuration could not be recorded (list --json says what)\n");
    }
    out.push_str("restorable window:\n");
    if l.windows.is_empty() {
        out.push_str("  none\n");
    }
    for w in &l.windows {
        out.push_str(&format!(
            "  timeline {}: {} .. {}\n",
            w.timeline,
            w.from.format("%Y-%m-%d %H:%M:%S%.3f+00"),
            w.to.format("%Y-%m-%d %H:%M:%S%.3f+00")
        ));
    }
    for (tli, g) in &l.wal_gaps {
        out.push_str(&format!(
            "WAL GAP on timeline {tli}: {} .. {} ({} segment(s) missing)\n",
            g.from, g.to, g.missing
        ));
    }
    out.trim_end().to_string()
}

pub fn render_wal_list(cluster: &str, s: &WalSummary) -> String {
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

/// What was restored, where the configuration went, and how the server was (or can be) started.
pub fn render_restore(out: &RestoreOutcome) -> String {
    let mut text = format!(
        "restored backup {} into {} ({} files, {}, {:.1} s) for recovery to {} on timeline {}",
        out.backup,
        out.pgdata,
        out.files,
        human_bytes(out.bytes),
        out.download_ms as f64 / 1000.0,
        out.target,
        out.timeline
            .map(|t| t.to_string())
            .unwrap_or_else(|| "?".into())
    );
    let conf = &out.configuration;
    if conf.held {
        if !conf.placed.is_empty() {
            text.push_str(&format!(
                "\nconfiguration from outside the data directory: {} file(s) into {}",
                conf.placed.len(),
                conf.config_dir.as_deref().unwrap_or(&out.pgdata)
            ));
            for p in &conf.placed {
                text.push_str(&format!("\n  {} ({}) -> {}", p.source, p.role, p.path));
            }
        }
        for r in &conf.rewritten {
            text.push_str(&format!("\n  rewritten: {r}"));
        }
        for n in &conf.notes {
            text.push_str(&format!("\nnote: {n}"));
        }
    }
    for w in &out.warnings {
        text.push_str(&format!("\nwarning: {w}"));
    }
    if let Some(s) = &out.started {
        for o in &s.overrides {
            text.push_str(&format!("\nstarted with {o}"));
        }
    }
    text.push('\n');
    text.push_str(&restore_server_line(out));
    text
}

/// The server `--start` ran and what it reached, or how to start it.
fn restore_server_line(out: &RestoreOutcome) -> String {
    match (&out.started, &out.configuration.config_dir) {
        (Some(s), _) => format!(
            "server started (port {}, socket {}): recovered to {} (LSN {}, timeline {}); \
             recovery {:.1} s, total {:.1} s",
            s.port,
            s.socket_dir,
            s.restored_to_time
                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
                .unwrap_or_else(|| "(no transaction replayed)".into()),
            s.restored_to_lsn.as_deref().unwrap_or("?"),
            s.timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into()),
            s.recovery_ms as f64 / 1000.0,
            s.total_ms as f64 / 1000.0
        ),
        (None, Some(d)) => format!(
            "start it with: pg_ctl -D {} -o \"-c config_file={d}/postgresql.conf\" start, or with \
             pg_ctlcluster when {d} is /etc/postgresql/VERSION/NAME (recovery.signal and the recovery \
             settings are in place)",
            out.pgdata
        ),
        (None, None) => format!(
            "start it with: pg_ctl -D {} start (recovery.signal and the recovery settings are in place)",
            out.pgdata
        ),
    }
}

pub fn render_audit_verify(reports: &[VerifyReport]) -> String {
    let mut text = String::new();
    for r in reports {
        text.push_str(&format!(
            "audit log of cluster {}: {} — {} record(s) in {} chain(s){}\n",
            r.cluster,
            if r.ok { "OK" } else { "FAILED" },
            r.records,
            r.chains.len(),
            if r.pending_here > 0 {
                format!(", {} waiting on this host to be uploaded", r.pending_here)
            } else {
                String::new()
            }
        ));
        for c in &r.chains {
            text.push_str(&format!(
                "  chain {} (host {}): {} record(s), {} .. {}, head seq {} sha256 {}\n",
                c.chain,
                c.host.as_deref().unwrap_or("?"),
                c.records,
                c.first.as_deref().unwrap_or("-"),
                c.last.as_deref().unwrap_or("-"),
                c.head_seq,
                c.head_sha256
            ));
        }
        for p in &r.problems {
            text.push_str(&format!("  PROBLEM: {p}\n"));
        }
    }
    text.trim_end().to_string()
}

pub fn render_audit(records: &[Listed]) -> String {
    let mut text = format!("{} audit record(s)", records.len());
    for l in records {
        let r = &l.record;
        text.push_str(&format!(
            "\n{} {:<8} {}@{} {:<13} {:<7}{}{}{}",
            r.time,
            r.cluster,
            r.user,
            r.host,
            r.operation,
            r.outcome,
            r.backup
                .as_deref()
                .map(|b| format!(" backup {b}"))
                .unwrap_or_default(),
            if r.objects.is_empty() {
                String::new()
            } else {
                format!(" {}", r.objects.join(" "))
            },
            r.detail
                .as_deref()
                .map(|d| format!(" — {d}"))
                .unwrap_or_default()
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(3 << 40), "3.0 TiB");
        assert_eq!(human_bytes(5000 << 40), "5000.0 TiB");
    }

    #[test]
    fn unmeasured_seconds_are_a_dash() {
        assert_eq!(seconds_or_dash(None), "-");
        assert_eq!(seconds_or_dash(Some(1260)), "1.3 s");
    }
}
