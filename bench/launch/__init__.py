"""Running one job, wherever it runs: build data, model and method from the job's config, train, write a record.

Every launcher ends in `execute(job)`: in this process (local, CPU), in a child process per GPU slot (local
queue; `python -m bench.launch SPEC`), or in a SLURM task (submitit). What they share is here: the job as data
(`job_spec`), signals turned into the engine's stop request, and torch.distributed for multi-GPU jobs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import UserError, lazy
from bench.results import Lock, Store, hardware, remove_leftovers, versions, write_durably

# what runs a job; the SLURM launcher imports this module for its helpers, and `bench status` imports that
torch, datasets, engine = lazy("torch"), lazy("bench.data"), lazy("bench.engine")
finetune, models, methods = lazy("bench.finetune"), lazy("bench.models"), lazy("methods")


def pretrain(cfg, run_dir, data_opts):
    res = cfg["resolution"]
    (split, size, max_side), = datasets.splits_of(cfg)
    train = datasets.load(cfg["data"], split, size, max_side=max_side, **data_opts)
    torch.manual_seed(cfg["seed"])
    backbone = models.create(cfg["backbone"], res, 0, cfg["drop_path"], cfg["model_kwargs"])
    method = methods.METHODS[cfg["method"]](backbone, backbone.num_features, len(train), len(train.classes),
                                            cfg["method_cfg"])
    last = engine.fit(method, train, cfg, run_dir, desc=f"pretrain {cfg['method']} {cfg['data']}")
    if engine.rank() != 0:
        return {}
    weights = models.export(method.backbone(), cfg["backbone"], res)
    write_durably(run_dir / "weights.pt", lambda f: torch.save(weights, f))  # before the record says done
    return {**engine.training_metrics(last), "train_size": train.kept("train"), "data": train.meta}


def _init_weights(job, store):
    """What a fine-tuning job starts from: its parent's weights, a file, timm's ImageNet weights, or nothing."""
    if job.parent:
        path = store.weights(job.parent)
        regenerate = f"run the same command with --rerun {job.parent[:10]} to train that job again"
        if not path.exists():
            raise UserError(f"job {job.short} needs the weights of {job.parent[:10]}, which are missing: {regenerate}")
        try:
            return models.read_weights(path, job.config["backbone"])
        except UserError as e:
            raise UserError(f"{e}: {regenerate}") from None
    if job.init_path:
        return models.read_weights(job.init_path, job.config["backbone"])
    if job.config["init"].startswith("timm:"):
        return models.imagenet_weights(job.config["backbone"])
    return None


def execute(job, store: Store, preset_name="", overrides=(), data_opts=None):
    """Run `job` to a record. A user error propagates (nothing is recorded: fix and re-run); a non-finite loss
    leaves a failed record that says so; a signal leaves a checkpoint and no record. Under torch.distributed
    every rank trains and rank 0 alone writes the record (the others return None).
    data_opts: root, skip_bad, cache_dir (see bench.data.load)."""
    data_opts = data_opts or {}
    run_dir = store.run_dir(job.hash)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{run_dir}: a file where the job's folder belongs; move it away and run again"
                        if run_dir.exists() else f"cannot create {run_dir}: {e.strerror}") from None
    if engine.rank() != 0:  # rank 0 holds the job's lock and decides for every rank whether to train
        return _train(job, store, run_dir, preset_name, overrides, data_opts) if _rank0_says(False) else None
    lock, said = Lock(run_dir), False
    while not lock.acquire():  # another process trains this job: wait, then use its record
        if engine.stop_requested():
            raise engine.Interrupted(engine.stop_requested(), saved=False)
        if not said:
            print(f"bench: job {job.short} is being trained by {lock.owner}; waiting for it", file=sys.stderr,
                  flush=True)
            said = True
        time.sleep(2)
    try:
        remove_leftovers(run_dir)
        rec = store.get(job.hash)
        done = rec is not None and rec["status"] == "done"  # trained by another process meanwhile
        if not _rank0_says(not done):
            return rec
        return _train(job, store, run_dir, preset_name, overrides, data_opts)
    finally:
        lock.release()


def _rank0_says(flag: bool) -> bool:
    """Rank 0's flag, on every rank of a multi-GPU job (the others pass anything)."""
    if engine.world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=engine.device())
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def _train(job, store, run_dir, preset_name, overrides, data_opts):
    cfg = job.config
    t0 = time.time()
    record = {"hash": job.hash, "stage": cfg["stage"], "method": job.method, "config": cfg, "seed": cfg["seed"],
              "cells": [list(c) for c in job.cells], "preset": preset_name, "overrides": list(overrides),
              "hardware": hardware(), "versions": versions(), "run_dir": str(run_dir)}
    try:
        if cfg["stage"] == "pretrain":
            metrics = pretrain(cfg, run_dir, data_opts)
        else:
            metrics = finetune.run(cfg, run_dir, _init_weights(job, store), data_opts)
        record.update(status="done", metrics=metrics)
    except engine.NonFiniteLoss as e:
        record.update(status="failed", error=str(e), metrics={})
    except (UserError, engine.Interrupted):
        raise
    except Exception as e:  # a crash is a result too: say what it was and where
        if engine.rank() != 0:  # rank 0 records it; here, exiting non-zero takes the job's other ranks down
            raise
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                      metrics={})
    if engine.rank() != 0:
        return None
    if engine.world_size() > 1:
        record["hardware"]["ranks"] = engine.world_size()
    earlier = record.get("metrics", {}).pop("earlier_sessions_s", 0)  # training before a resume counts too
    record.update(wall_time_s=round(time.time() - t0 + earlier, 2),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    store.put(record)
    if record["status"] == "done":  # the record and weights.pt are the result; the optimiser state is dead weight
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """While jobs run: SIGTERM / SIGUSR2 / Ctrl-C ask the engine to save and stop (it raises Interrupted at the
    next step); a request that comes outside training (waiting for a lock, decoding, evaluating) is acted on there
    or by the caller between jobs (`engine.stop_requested()`)."""
    engine.clear_stop_requests()
    old = {s: signal.signal(s, lambda signum, _frame: engine.request_stop(signum)) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        engine.clear_stop_requests()


def init_distributed(rank, world, local_rank, master_addr, master_port):
    """One process per GPU (or per CPU process in tests: gloo); the engine reads rank and world size from here."""
    if world <= 1:
        return
    os.environ["LOCAL_RANK"] = str(local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                         world_size=world)


def job_spec(job, results, preset_name, overrides, data_opts):
    """Everything a job process needs, as JSON-able data (local queue) or a pickle (submitit)."""
    return {"job": dataclasses.asdict(job), "results": str(results), "preset": preset_name,
            "overrides": list(overrides), "data_opts": data_opts or {}}


def time_left(pending, running, finished, slots=1):
    """Rough seconds until the `pending` jobs and the `running` ones (counted half done) end, `slots` at a time:
    each job's epochs at the seconds per epoch of the finished jobs of its stage (of every stage until one of its
    stage has finished), so that a long pretraining does not make a short fine-tuning look long. pending,
    running: [job config]; finished: [(job config, seconds)]. None until a job has finished."""
    rates = {}
    for cfg, secs in finished:
        rates.setdefault(cfg["stage"], []).append(secs / max(1, cfg["epochs"]))
    every = [r for rs in rates.values() for r in rs]
    if not every:
        return None
    per_epoch = {stage: sum(rs) / len(rs) for stage, rs in rates.items()}
    cost = lambda cfg: per_epoch.get(cfg["stage"], sum(every) / len(every)) * cfg["epochs"]  # noqa: E731
    return (sum(map(cost, pending)) + sum(map(cost, running)) / 2) / max(1, slots)


def about(secs):
    """How long is left, as a progress line says it: seconds under a minute ("0.0 min" said nothing)."""
    return f"about {secs:.0f} s left" if secs < 60 else f"about {secs / 60:.1f} min left"


def launch_info(job, **info):
    """What `bench status` shows of a job that has no record yet: where it went and what it is."""
    c = job.config
    return {**info, "submitted": time.time(), "job": {"stage": c["stage"], "method": job.method,
            "backbone": c["backbone"], "data": c["data"], "epochs": c["epochs"], "parent": job.parent}}


def run_spec(spec):
    """Run one job from its spec in this process, signals handled; returns the record (None on ranks > 0)."""
    from bench.plan import Job

    job = Job(**{**spec["job"], "cells": [tuple(c) for c in spec["job"]["cells"]]})
    with stop_on_signals():
        return execute(job, Store(spec["results"]), spec["preset"], spec["overrides"], spec["data_opts"])


def main(argv=None):
    """`python -m bench.launch SPEC.json`: a job process of the local queue. torchrun-style variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) make it one rank of a multi-GPU job.
    Exit: 0 done, 1 failed record, 2 user error, 128+N stopped by signal N (checkpoint saved)."""
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    env = os.environ
    init_distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500"))
    try:
        record = run_spec(spec)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except engine.Interrupted as e:
        print(f"bench: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0 if record is None or record["status"] == "done" else 1
