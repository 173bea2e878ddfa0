#!/usr/bin/env python3
"""scripts/bench/report.py RESULTS.tsv META.json

Prints the tables of scripts/bench-backup (tidemark) from its raw results: one row per
(target, tool) with the median over the rounds, then the tidemark/pgBackRest ratios, then
a detail table (CPU seconds, per-process peak, PSS, process count, size check).

RESULTS.tsv columns (header line first): round target tool phase wall_s rc user_s sys_s
main_maxrss_kib tree_rss_kib tree_pss_kib sum_hwm_kib repo_bytes repo_objects
backup_bytes restored_bytes
"""
import csv
import json
import statistics
import sys

MB = 1e6
MIB = 1024.0


def med(rows, key):
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "", "-")]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(v, spec)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def main():
    rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
    meta = json.load(open(sys.argv[2]))
    db = meta["db_bytes"]
    targets = []
    for r in rows:
        if r["target"] not in targets:
            targets.append(r["target"])
    tools = ["tidemark", "pgbackrest"]

    def pick(target, tool, phase):
        return [r for r in rows if r["target"] == target and r["tool"] == tool and r["phase"] == phase]

    rounds = max(int(r["round"]) for r in rows) if rows else 0
    print()
    print(f"tidemark {meta['tidemark_version']} vs pgBackRest {meta['pgbackrest_version']} "
          f"(PostgreSQL {meta['pg_version']})")
    print(f"pgbench scale {meta['scale']}: database {db / MB:,.0f} MB on disk (pgdata without pg_wal, "
          f"{meta['db_files']} files); parallel {meta['parallel']}; zstd level 3; "
          f"encryption: tidemark AES-256-GCM, pgBackRest aes-256-cbc")
    print(f"page cache dropped before every backup and restore: {meta['caches_dropped']}; "
          f"rounds: {rounds} (medians shown); {meta['cpus']} CPUs, load average (1/5/15 min) "
          f"before/after the runs: {meta.get('loadavg', '?')}")
    print("MB = 10^6 bytes, MiB = 2^20 bytes; MB/s = database size / wall time; peak RSS = "
          "max over 100 ms samples of the summed RSS of the tool's process tree "
          "(or the main process's own maximum from time -v, if higher);")
    print("stored = bytes the run added to the repository (backup + its WAL + metadata; "
          "sum of file/object sizes)")
    print()
    hdr = (f"{'target':<10} {'tool':<11} {'backup s':>9} {'MB/s':>7} {'RSS MiB':>8}   "
           f"{'restore s':>9} {'MB/s':>7} {'RSS MiB':>8}   {'stored MB':>10} {'% of db':>7}")
    print(hdr)
    print("-" * len(hdr))
    summary = {}
    for t in targets:
        for tool in tools:
            b, rs = pick(t, tool, "backup"), pick(t, tool, "restore")
            if not b and not rs:
                continue
            bw, rw = med(b, "wall_s"), med(rs, "wall_s")
            bm = max(med(b, "tree_rss_kib") or 0, med(b, "main_maxrss_kib") or 0) / MIB if b else None
            rm = max(med(rs, "tree_rss_kib") or 0, med(rs, "main_maxrss_kib") or 0) / MIB if rs else None
            st = med(b, "repo_bytes")
            summary[(t, tool)] = (bw, bm, rw, rm, st)
            print(f"{t:<10} {tool:<11} {fmt(bw, '9.2f')} {fmt(db / MB / bw if bw else None, '7.1f')} "
                  f"{fmt(bm, '8.1f')}   {fmt(rw, '9.2f')} {fmt(db / MB / rw if rw else None, '7.1f')} "
                  f"{fmt(rm, '8.1f')}   {fmt(st / MB if st is not None else None, '10.1f')} "
                  f"{fmt(100 * st / db if st is not None else None, '6.1f')}%")
        a, p = summary.get((t, "tidemark")), summary.get((t, "pgbackrest"))
        if a and p:
            print(f"{t:<10} {'tm/pgbr':<11} {ratio(a[0], p[0]):>9} {'':>7} {ratio(a[1], p[1]):>8}   "
                  f"{ratio(a[2], p[2]):>9} {'':>7} {ratio(a[3], p[3]):>8}   {ratio(a[4], p[4]):>10}")
        print()
    print("ratios are tidemark / pgBackRest of time, peak RSS and stored bytes: below 1.00x "
          "means tidemark is faster / smaller")
    print("backup s is the whole command: pgBackRest's includes its archive check at the start "
          "and expire at the end, tidemark's its wait for the backup's WAL (polled every 250 ms); "
          "restore s includes each tool's own fsync/syncfs.")
    if any(t.startswith("garage") for t in targets):
        print("garage: tidemark talks plain http to Garage, pgBackRest https through the nginx proxy "
              "(its S3 driver needs TLS); garage-tls: both go through the proxy.")
    print()
    print("detail (medians): CPU = user+sys seconds of the whole process tree (time -v); "
          "main = main process max RSS (time -v);")
    print("PSS = peak summed proportional set size; hwm = sum of per-process peaks; "
          "procs = most tool processes alive at once;")
    print("objects = files/objects the backup added to the repository; backup MB = the backup's own "
          "stored bytes as the tool reports them (tidemark --json stored_bytes, pgBackRest info "
          "repository delta)")
    hdr2 = (f"{'target':<10} {'tool':<11} {'phase':<8} {'wall s':>7} {'CPU s':>7} {'CPU %':>6} "
            f"{'main MiB':>9} {'tree MiB':>9} {'PSS MiB':>8} {'hwm MiB':>8} {'procs':>5} "
            f"{'objects':>8} {'backup MB':>10} {'restored MB':>11}")
    print(hdr2)
    print("-" * len(hdr2))
    for t in targets:
        for tool in tools:
            for phase in ("backup", "restore"):
                rs = pick(t, tool, phase)
                if not rs:
                    continue
                w = med(rs, "wall_s")
                cpu = statistics.median(float(r["user_s"]) + float(r["sys_s"]) for r in rs)

                def mib(k):
                    v = med(rs, k)
                    return None if v is None else v / MIB

                def mb(k):
                    v = med(rs, k)
                    return None if v is None else v / MB

                print(f"{t:<10} {tool:<11} {phase:<8} {fmt(w, '7.2f')} {cpu:7.2f} "
                      f"{fmt(100 * cpu / w if w else None, '5.0f')}% "
                      f"{fmt(mib('main_maxrss_kib'), '9.1f')} {fmt(mib('tree_rss_kib'), '9.1f')} "
                      f"{fmt(mib('tree_pss_kib'), '8.1f')} {fmt(mib('sum_hwm_kib'), '8.1f')} "
                      f"{fmt(med(rs, 'procs'), '5.0f')} "
                      f"{fmt(med(rs, 'repo_objects'), '8.0f')} {fmt(mb('backup_bytes'), '10.1f')} "
                      f"{fmt(mb('restored_bytes'), '11.1f')}")
    print()
    if rounds > 1:
        print("all rounds (wall s):")
        for t in targets:
            for tool in tools:
                for phase in ("backup", "restore"):
                    rs = pick(t, tool, phase)
                    if rs:
                        print(f"  {t:<10} {tool:<11} {phase:<8} "
                              + " ".join(f"{float(r['wall_s']):.2f}" for r in rs))
        print()


if __name__ == "__main__":
    main()
