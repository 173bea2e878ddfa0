//! Waiting for a backup's WAL: a backup is complete only once every segment from its start to
//! its stop LSN (and its row-count point) is in the repository.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::pg::wal::segment_name;
use crate::repo::Repository;

/// Waits until segments first..=last of `timeline` are archived.
pub(super) async fn wait_for_wal(
    repo: &Repository,
    timeline: u32,
    first: u64,
    last: u64,
    seg_size: u64,
    timeout: Duration,
) -> Result<(), Error> {
    let t = Instant::now();
    // List only names sharing the first and last segment's common prefix, not the whole
    // archive of the timeline (which grows to many thousands of objects).
    let (a, b) = (
        segment_name(timeline, first, seg_size),
        segment_name(timeline, last, seg_size),
    );
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    loop {
        let have = repo.archived_wal_names(timeline, &a[..common]).await?;
        let missing: Vec<String> = (first..=last)
            .map(|s| segment_name(timeline, s, seg_size))
            .filter(|n| !have.contains(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(Error::Wal(format!(
                "the backup's WAL was not archived within {timeout:?}: missing {} (first missing {}); \
                 check archive_command and pg_stat_archiver",
                missing.len(),
                missing[0]
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
