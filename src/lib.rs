//! tidemark: PostgreSQL backup and point-in-time recovery.
//!
//! Layers (a lower one never imports a higher one), top to bottom:
//! `cli` → operations (`wal`) → `repo` (catalog) → `transfer` → `pipeline` / `store` → `pg`,
//! `config`. See docs/architecture.md.

pub mod pipeline;
pub mod store;
pub mod pg;
pub mod config;
pub mod repo;
pub mod transfer;
pub mod cluster;
pub mod error;
pub mod init;
pub mod wal;
