//! PostgreSQL facts: WAL file names and LSN arithmetic (`wal`), the on-disk headers tidemark
//! reads (`control`), and queries over a connection (`conn`). Nothing here knows the repository.

pub mod conffiles;
pub mod conn;
pub mod control;
pub mod files;
pub mod history;
pub mod tls;
pub mod wal;
pub mod walscan;
