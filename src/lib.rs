//! tidemark: PostgreSQL backup and point-in-time recovery.
//!
//! Layers (a lower one never imports a higher one; `scripts/check-layers` checks it), top to
//! bottom: `cli/` (the binary) → `daemon` → operations (`init`, `wal`, `backup`, `list`,
//! `restore`, `expire`, `check`, `drill`, `audit`) → support (`cluster`, `parallel`,
//! `progress`, `error`, `state`) → `repo` (catalog) → `transfer` → `pipeline` → `store` → `pg`
//! → `config`, `schedule` → base (`rand`, `host`). See docs/architecture.md.

pub mod audit;
pub mod backup;
pub mod check;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod error;
pub mod expire;
pub mod host;
pub mod init;
pub mod list;
pub mod parallel;
pub mod pg;
pub mod pipeline;
pub mod progress;
pub mod rand;
pub mod repo;
pub mod restore;
pub mod schedule;
pub mod state;
pub mod store;
pub mod transfer;
pub mod wal;
