//! The WAL scanner against segments written by a real PostgreSQL: it must find exactly the last
//! commit (timestamp and LSN) PostgreSQL reports for the last transaction of a segment.

mod common;

use common::*;
use tidemark::pg::wal::{Lsn, WalFileName};
use tidemark::pg::walscan::WalScanner;

#[tokio::test(flavor = "multi_thread")]
async fn finds_the_last_commit_of_a_segment() {
    let dir = TestDir::new("scan");
    let pg = PgCluster::start(
        &dir,
        "pg",
        PgOptions {
            extra_conf: "track_commit_timestamp = on\nautovacuum = off\n",
            ..Default::default()
        },
    );
    let c = pg.client().await;
    c.batch_execute("create table t(x int)").await.unwrap();
    // Several segments: a big one with many records crossing pages, and small ones.
    for (rows, big) in [(1, false), (20000, true), (3, false)] {
        let mut last = None;
        for i in 0..rows.min(50) {
            c.batch_execute(&format!(
                "insert into t select g from generate_series(1, {}) g",
                if big { 2000 } else { 1 } + i
            ))
            .await
            .unwrap();
            let row = c
                .query_one(
                    "select pg_xact_commit_timestamp(xmin)::text, (extract(epoch from pg_xact_commit_timestamp(xmin)) * 1000000)::bigint \
                     from t order by pg_xact_commit_timestamp(xmin) desc limit 1",
                    &[],
                )
                .await
                .unwrap();
            last = Some(row.get::<_, i64>(1));
        }
        let name: String = c
            .query_one("select pg_walfile_name(pg_switch_wal())", &[])
            .await
            .unwrap()
            .get(0);
        let f = WalFileName::parse(&name).unwrap();
        let ss = 16u64 << 20;
        let bytes = std::fs::read(pg.data.join("pg_wal").join(&name)).unwrap();
        let mut scanner = WalScanner::new(Lsn(f.segment_no(ss).unwrap() * ss));
        // Feed in odd-sized pieces to exercise every state boundary.
        for chunk in bytes.chunks(7777) {
            std::io::Write::write_all(&mut scanner, chunk).unwrap();
        }
        let scan = scanner.finish();
        let (t, lsn) = scan.last_xact.expect("a commit in the segment");
        assert_eq!(t.timestamp_micros(), last.unwrap(), "segment {name}");
        assert!(
            lsn.0 / ss == f.segment_no(ss).unwrap(),
            "{lsn} outside {name}"
        );
        assert!(scan.last_record.unwrap() >= lsn);
    }
}
