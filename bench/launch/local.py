"""Run jobs in this process, parents first, skipping the ones the store already has."""
from __future__ import annotations

import sys

from bench.launch import execute


def run(jobs, store, preset_name, overrides=(), data_opts=None, log=lambda m: print(m, file=sys.stderr)):
    todo = [j for j in jobs if not j.skip and store.state(j.hash) != "done"]
    failed = set()
    for i, job in enumerate(todo, 1):
        if job.parent in failed:
            failed.add(job.hash)
            log(f"[{i}/{len(todo)}] {job.short} not run: its parent {job.parent[:10]} failed")
            continue
        c = job.config
        log(f"[{i}/{len(todo)}] {job.short} {c['stage']} {job.method} {c['backbone']} {c['data']} "
            f"{c['resolution']}px {c['epochs']} epochs")
        rec = execute(job, store, preset_name, overrides, data_opts)
        if rec["status"] == "done":
            top1 = rec["metrics"].get("top1")
            log(f"[{i}/{len(todo)}] {job.short} done in {rec['wall_time_s']:.0f}s"
                + (f", top-1 {100 * top1:.1f}%" if top1 is not None else ""))
        else:
            failed.add(job.hash)
            log(f"[{i}/{len(todo)}] {job.short} FAILED: {rec['error']}")
    return len(todo), len(failed)
