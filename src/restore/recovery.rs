//! How the restored server recovers: backup_label (where replay starts), tidemark's recovery
//! settings in postgresql.auto.conf (replacing any earlier ones) and recovery.signal.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::Serialize;

use super::plan::RestorePlan;
use super::{ArchiveMode, RecoveryTarget};
use crate::error::Error;

/// What the restored server runs to fetch WAL: this binary, with this config file, for this
/// cluster (`<exe> --config <config> --cluster <cluster> wal-fetch %f %p`).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreCommand {
    pub exe: PathBuf,
    /// Absolute: the server runs the command from its own directory.
    pub config: PathBuf,
    pub cluster: String,
}

impl RestoreCommand {
    pub(super) fn new(exe: &Path, config_path: &Path, cluster: &str) -> RestoreCommand {
        let config = std::path::absolute(config_path).unwrap_or(config_path.to_path_buf());
        RestoreCommand {
            exe: exe.to_path_buf(),
            config,
            cluster: cluster.to_string(),
        }
    }

    fn command_line(&self) -> String {
        format!(
            "{} --config {} --cluster {} wal-fetch %f %p",
            shell_quote(&self.exe.display().to_string()),
            shell_quote(&self.config.display().to_string()),
            shell_quote(&self.cluster)
        )
    }
}

/// One line of postgresql.auto.conf: `name = value`, the value as written (quoted where it
/// needs to be).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoverySetting {
    pub name: String,
    pub value: String,
}

/// Settings tidemark owns in postgresql.auto.conf; earlier values are removed first, so a
/// backup of a restored cluster does not carry an old target into the next restore.
const RECOVERY_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "archive_mode",
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(super) fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-=:".contains(&b))
    {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('$', "\\$")
                .replace('`', "\\`")
        )
    }
}

/// The recovery settings of a restore, in the order they are written.
pub(super) fn recovery_settings(
    restore_command: &RestoreCommand,
    target: &RecoveryTarget,
    exclusive: bool,
    timeline: u32,
    archive_mode: ArchiveMode,
) -> Vec<RecoverySetting> {
    let set = |name: &str, value: String| RecoverySetting {
        name: name.to_string(),
        value,
    };
    let mut settings = vec![set(
        "restore_command",
        quote(&restore_command.command_line()),
    )];
    match target {
        RecoveryTarget::Time(t) => settings.push(set(
            "recovery_target_time",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string()),
        )),
        RecoveryTarget::Lsn(l) => settings.push(set("recovery_target_lsn", quote(&l.to_string()))),
        RecoveryTarget::Xid(x) => settings.push(set("recovery_target_xid", quote(x))),
        RecoveryTarget::Name(n) => settings.push(set("recovery_target_name", quote(n))),
        RecoveryTarget::Immediate => settings.push(set("recovery_target", "'immediate'".into())),
        RecoveryTarget::Latest => {}
    }
    if matches!(
        target,
        RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_) | RecoveryTarget::Xid(_)
    ) {
        settings.push(set("recovery_target_inclusive", (!exclusive).to_string()));
    }
    settings.push(set(
        "recovery_target_timeline",
        quote(&timeline.to_string()),
    ));
    settings.push(set("recovery_target_action", "'promote'".into()));
    if archive_mode == ArchiveMode::Off {
        settings.push(set("archive_mode", "'off'".into()));
    }
    settings
}

/// Writes backup_label, the plan's recovery settings into postgresql.auto.conf (keeping the
/// cluster's own settings) and recovery.signal, each mode 0600.
pub(super) fn write_recovery_config(plan: &RestorePlan) -> Result<(), Error> {
    let io_err = |p: &Path, e: io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    let label = plan.pgdata.join("backup_label");
    std::fs::write(&label, &plan.manifest.backup_label).map_err(|e| io_err(&label, e))?;
    std::fs::set_permissions(&label, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&label, e))?;

    let mut lines = vec![format!(
        "# recovery settings written by tidemark restore of backup {} at {}",
        plan.backup,
        Utc::now().to_rfc3339()
    )];
    lines.extend(
        plan.recovery_settings
            .iter()
            .map(|s| format!("{} = {}", s.name, s.value)),
    );
    let auto = plan.pgdata.join("postgresql.auto.conf");
    // Missing is fine (nothing to keep); unreadable is not: rewriting it would drop the
    // cluster's own settings.
    let existing = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&auto, e)),
    };
    let kept: Vec<&str> = existing
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !RECOVERY_KEYS.contains(&key)
                && !l.starts_with("# recovery settings written by tidemark")
        })
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&lines.join("\n"));
    text.push('\n');
    std::fs::write(&auto, text).map_err(|e| io_err(&auto, e))?;
    std::fs::set_permissions(&auto, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&auto, e))?;
    let signal = plan.pgdata.join("recovery.signal");
    File::create(&signal).map_err(|e| io_err(&signal, e))?;
    std::fs::set_permissions(&signal, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&signal, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(target: RecoveryTarget, exclusive: bool, mode: ArchiveMode) -> Vec<String> {
        let cmd = RestoreCommand {
            exe: "/usr/bin/tidemark".into(),
            config: "/etc/tidemark/my config.toml".into(),
            cluster: "main".into(),
        };
        recovery_settings(&cmd, &target, exclusive, 3, mode)
            .iter()
            .map(|s| format!("{} = {}", s.name, s.value))
            .collect()
    }

    // The lines postgresql.auto.conf gets, as restore wrote them before the plan existed.
    #[test]
    fn settings_are_the_lines_written() {
        let t = crate::restore::parse_target_time("2026-11-27 09:41:07.5+02").unwrap();
        assert_eq!(
            lines(RecoveryTarget::Time(t), true, ArchiveMode::Off),
            [
                "restore_command = '/usr/bin/tidemark --config \"/etc/tidemark/my config.toml\" --cluster main wal-fetch %f %p'",
                "recovery_target_time = '2026-11-27 09:41:07.500000+02:00'",
                "recovery_target_inclusive = false",
                "recovery_target_timeline = '3'",
                "recovery_target_action = 'promote'",
                "archive_mode = 'off'",
            ]
        );
        assert_eq!(
            lines(
                RecoveryTarget::Name("it's".into()),
                false,
                ArchiveMode::Preserve
            )[1..],
            [
                "recovery_target_name = 'it''s'",
                "recovery_target_timeline = '3'",
                "recovery_target_action = 'promote'",
            ]
        );
        assert_eq!(
            lines(RecoveryTarget::Immediate, false, ArchiveMode::Preserve)[1],
            "recovery_target = 'immediate'"
        );
        assert_eq!(
            lines(RecoveryTarget::Latest, false, ArchiveMode::Preserve).len(),
            3
        );
    }
}
