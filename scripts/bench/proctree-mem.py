#!/usr/bin/env python3
"""scripts/bench/proctree-mem.py ROOT_PID OUT [INTERVAL]

Samples, every INTERVAL seconds (default 0.1) until ROOT_PID is gone, the memory of
ROOT_PID's process tree (ROOT_PID and all its descendants, found through /proc/*/stat),
leaving out the measuring wrappers themselves (processes named runuser or time).
Writes one JSON object to OUT:
  peak_rss_kib      highest sum of VmRSS over the tree seen in one sample
  peak_pss_kib      highest sum of Pss (smaps_rollup; shared pages counted once)
  sum_hwm_kib       sum over every process ever seen of its own VmHWM (an upper bound
                    of the tree's peak: the per-process peaks need not coincide)
  max_procs         most processes of the tree alive in one sample
  samples           number of samples taken
Part of scripts/bench-backup (tidemark); needs root to read other users' smaps_rollup.
"""
import json
import os
import sys
import time

WRAPPERS = {"runuser", "time"}


def stat_of(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read().decode("latin-1")
    except OSError:
        return None
    # comm is in parentheses and may contain spaces: split at the last ')'.
    lp, rp = s.index("("), s.rindex(")")
    comm = s[lp + 1:rp]
    rest = s[rp + 2:].split()
    return comm, int(rest[1])  # (comm, ppid)


def status_kib(pid, fields):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in fields:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree(root):
    children, comms = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = stat_of(int(d))
        if st is None:
            continue
        comms[int(d)] = st[0]
        children.setdefault(st[1], []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in comms:
            out.append((p, comms[p]))
        todo.extend(children.get(p, []))
    return out


def main():
    root, path = int(sys.argv[1]), sys.argv[2]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    peak_rss = peak_pss = max_procs = samples = 0
    hwm = {}
    while os.path.exists(f"/proc/{root}"):
        procs = [(p, c) for p, c in tree(root) if c not in WRAPPERS]
        rss = pss = 0
        for p, c in procs:
            st = status_kib(p, ("VmRSS", "VmHWM"))
            rss += st.get("VmRSS", 0)
            if st.get("VmHWM"):
                hwm[(p, c)] = max(hwm.get((p, c), 0), st["VmHWM"])
            pss += pss_kib(p)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        max_procs = max(max_procs, len(procs))
        samples += 1
        time.sleep(interval)
    with open(path, "w") as f:
        json.dump({"peak_rss_kib": peak_rss, "peak_pss_kib": peak_pss,
                   "sum_hwm_kib": sum(hwm.values()), "max_procs": max_procs,
                   "samples": samples}, f)


if __name__ == "__main__":
    main()
