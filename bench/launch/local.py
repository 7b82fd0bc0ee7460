"""The local launcher: jobs one after another in this process (CPU), or a queue of job processes over the GPUs.

The queue keeps every device busy: each job runs as `python -m bench.launch SPEC` with CUDA_VISIBLE_DEVICES
naming its GPU(s), up to `jobs_per_gpu` jobs share a GPU, and a job of `gpus_per_job` GPUs runs as that many
ranks of torch.distributed. A job starts when its parent has a record; a failed parent's children are not run.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import torch

from bench import engine
from bench.engine import Interrupted
from bench.launch import about, execute, job_spec, launch_info, stop_on_signals, time_left
from bench.results import Lock, write_durably


def visible_gpus():
    """The GPU ids this machine lets us use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()] if torch.cuda.is_available() else []
    return [str(i) for i in range(torch.cuda.device_count())]


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def _describe(job):
    c = job.config
    return (f"{job.short} {c['stage']} {job.method} {c['backbone']} {c['data']} {c['resolution']}px "
            f"{c['epochs']} epochs")


def _outcome(job, rec):
    if rec["status"] == "done":
        top1 = rec["metrics"].get("top1")
        return f"{job.short} done in {rec['wall_time_s']:.0f}s" + (f", top-1 {100 * top1:.1f}%" if top1 is not None else "")
    return f"{job.short} FAILED: {rec['error']}"


def run(jobs, store, preset_name, overrides=(), data_opts=None, devices=None, jobs_per_gpu=1, gpus_per_job=1,
        log=_stderr):
    """Run every job without a record, parents first. Returns (jobs run, jobs failed or not run)."""
    todo = [j for j in jobs if not j.skip and store.state(j.hash) != "done"]
    if devices:
        return Queue(todo, store, job_spec_args=(preset_name, overrides, data_opts), devices=devices,
                     jobs_per_gpu=jobs_per_gpu, gpus_per_job=gpus_per_job, log=log).run()
    failed, finished = set(), []
    with stop_on_signals():
        for i, job in enumerate(todo, 1):
            if job.parent in failed:
                failed.add(job.hash)
                log(f"[{i}/{len(todo)}] {job.short} not run: its parent {job.parent[:10]} failed")
                continue
            log(f"[{i}/{len(todo)}] {_describe(job)}")
            try:  # what `bench status` shows of it while it trains, or once stopped (its stage, method, data);
                if not Lock(store.run_dir(job.hash)).holder():  # not over the note of the process training it
                    store.put_launch(job.hash, launch_info(job, launcher="local", pid=os.getpid()))
            except OSError:
                pass  # execute names what keeps the job's folder from being made
            t0 = time.time()
            rec = execute(job, store, preset_name, overrides, data_opts)
            if rec["status"] == "done":  # (a failed job's seconds are no speed)
                finished.append((job.config, time.time() - t0))
            else:
                failed.add(job.hash)
            gone, rest = set(failed), []  # what will run: not the jobs below a failed one
            for j in todo[i:]:
                if j.parent in gone:
                    gone.add(j.hash)
                else:
                    rest.append(j.config)
            left = time_left(rest, [], finished)
            log(f"[{i}/{len(todo)}] {_outcome(job, rec)}" + (f"; {about(left)}" if rest and left is not None else ""))
            if engine.stop_requested() and i < len(todo):  # it came while the job evaluated: its record is in
                raise Interrupted(engine.stop_requested(), saved=False)
    return len(todo), len(failed)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Queue:
    """Job processes over device slots. Scheduling: ready jobs (parent done) in plan order, pretraining first
    (it unlocks the fine-tuning jobs), each on the least-loaded devices that have a free slot."""

    def __init__(self, todo, store, job_spec_args, devices, jobs_per_gpu=1, gpus_per_job=1, log=_stderr):
        if gpus_per_job > len(devices):
            raise ValueError(f"a job needs {gpus_per_job} GPUs, {len(devices)} are visible")
        self.pending = sorted(todo, key=lambda j: j.config["stage"] != "pretrain")  # stable: plan order kept
        self.store, self.spec_args, self.log = store, job_spec_args, log
        self.devices, self.per_gpu, self.per_job = list(devices), jobs_per_gpu, gpus_per_job
        self.load = Counter()
        self.running = {}  # hash -> (job, [Popen], devices, start time)
        self.done, self.failed, self.walls = set(), set(), []
        self.total = len(todo)
        self.stop = []
        # processes per slot: the CPU cores shared out, so that packed jobs do not oversubscribe them
        self.threads = max(1, (os.cpu_count() or 1) // (len(devices) * jobs_per_gpu))

    def _ready(self, job):
        return job.parent is None or job.parent in self.done or self.store.state(job.parent) == "done"

    def _pick_devices(self):
        free = sorted((self.load[d], i, d) for i, d in enumerate(self.devices) if self.load[d] < self.per_gpu)
        return [d for _, _, d in free[:self.per_job]] if len(free) >= self.per_job else None

    def _start(self, job, devs):
        run_dir = self.store.run_dir(job.hash)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / "job.json"
        # whole or not at all: a second queue on this store may be starting the job too, its process reading it
        write_durably(spec_path, json.dumps(job_spec(job, self.store.root, *self.spec_args)))
        log_path = run_dir / "job.log"
        port = _free_port() if self.per_job > 1 else 0
        procs = []
        with open(log_path, "a") as out:
            for r in range(self.per_job):
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(devs), "OMP_NUM_THREADS": str(self.threads),
                       "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(self.per_job),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                procs.append(subprocess.Popen([sys.executable, "-m", "bench.launch", str(spec_path)], env=env,
                                              stdout=out, stderr=subprocess.STDOUT))
        for d in devs:
            self.load[d] += 1
        self.store.put_launch(job.hash, launch_info(job, launcher="local", devices=devs, log=str(log_path),
                                                    pids=[p.pid for p in procs]))
        self.running[job.hash] = (job, procs, devs, time.time())
        self.log(f"start {_describe(job)} on GPU {','.join(devs)}")

    def _finish(self, h):
        job, procs, devs, t0 = self.running.pop(h)
        for d in devs:
            self.load[d] -= 1
        codes = [p.returncode for p in procs]
        rec = self.store.get(h)
        if rec is not None and rec["status"] == "done":
            self.done.add(h)
            self.walls.append((job.config, time.time() - t0))
            self.log(_outcome(job, rec))
        elif rec is not None:
            self.failed.add(h)
            self.log(_outcome(job, rec))
        elif not self.stop:
            self.failed.add(h)
            last = self.store.run_dir(h) / "job.log"
            tail = last.read_text(errors="replace").strip().splitlines()[-1:] if last.exists() else []
            self.log(f"{job.short} FAILED: exit code {max(codes, key=abs)}, no record"
                     + (f": {tail[0]}" if tail else "") + f" (log: {last})")

    def _progress(self):
        left = len(self.pending)
        line = f"jobs: {len(self.done)} done, {len(self.running)} running, {left} left"
        if self.failed:
            line += f", {len(self.failed)} failed or not run"
        if self.walls and (left or self.running):
            slots = max(1, len(self.devices) * self.per_gpu // self.per_job)
            secs = time_left([j.config for j in self.pending], [j.config for j, *_ in self.running.values()],
                             self.walls, slots)
            line += f"; {about(secs)}"
        self.log(line)

    def run(self):
        handler = lambda signum, _frame: self.stop.append(signum)  # noqa: E731
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
        try:
            while (self.pending or self.running) and not self.stop:
                if not self.running and not any(self._ready(j) or j.parent in self.failed for j in self.pending):
                    for job in self.pending:  # cannot happen with a plan's jobs; never spin on it
                        self.failed.add(job.hash)
                        self.log(f"{job.short} not run: its parent {job.parent[:10]} is neither done nor planned")
                    self.pending = []
                    break
                for job in list(self.pending):
                    if job.parent in self.failed:
                        self.pending.remove(job)
                        self.failed.add(job.hash)
                        self.log(f"{job.short} not run: its parent {job.parent[:10]} failed")
                    elif self._ready(job):
                        devs = self._pick_devices()
                        if devs is None:
                            break
                        self.pending.remove(job)
                        self._start(job, devs)
                changed = self._wait()
                if changed:
                    self._progress()
            if self.stop:  # ask every job to save a checkpoint, then wait for them
                for _, procs, _, _ in self.running.values():
                    for p in procs:
                        p.send_signal(signal.SIGTERM)
                for h in list(self.running):
                    for p in self.running[h][1]:
                        p.wait()
                    self._finish(h)
                raise Interrupted(self.stop[0], saved=False)  # each job process said for itself (its log)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.total, len(self.failed)

    def _wait(self, poll=0.2):
        """Until a job ends (True) or a signal arrives; a rank that fails takes its job's other ranks down."""
        while not self.stop:
            ended = []
            for h, (_, procs, _, _) in self.running.items():
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes):
                    for p, c in zip(procs, codes):
                        if c is None:  # blocked in a collective that will never complete
                            p.kill()
                    for p in procs:
                        p.wait()
                    ended.append(h)
                elif all(c == 0 for c in codes):
                    ended.append(h)
            for h in ended:
                self._finish(h)
            if ended or not self.running:
                return bool(ended)
            time.sleep(poll)
        return False
