"""Running one job, wherever it runs: build data, model and method from the job's config, train, write a record."""
from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone

import torch

from bench import data as datasets
from bench import finetune, models
from bench.engine import Interrupted, NonFiniteLoss, fit
from bench.errors import UserError
from bench.results import Store, hardware, versions
from methods import METHODS


def pretrain(cfg, run_dir, data_opts):
    res = cfg["resolution"]
    # twice the crop size: small crops (5% of the area) still come from real pixels, not upsampled ones
    train = datasets.load(cfg["data"], "train", 2 * res, **data_opts)
    torch.manual_seed(cfg["seed"])
    backbone = models.create(cfg["backbone"], res, 0, cfg["drop_path"], cfg["model_kwargs"])
    method = METHODS[cfg["method"]](backbone, backbone.num_features, len(train), len(train.classes),
                                    cfg["method_cfg"])
    last = fit(method, train, cfg, run_dir, desc=f"pretrain {cfg['method']} {cfg['data']}")
    torch.save(models.export(method.backbone(), cfg["backbone"], res), run_dir / "weights.pt")
    return {"train_loss": last.get("loss"), "train_images_per_s": last.get("images_per_s"),
            "train_size": len(train), "data": train.meta}


def _init_weights(job, store):
    """What a fine-tuning job starts from: its parent's weights, a file, timm's ImageNet weights, or nothing."""
    if job.parent:
        path = store.weights(job.parent)
        if not path.exists():
            raise UserError(f"job {job.short} needs the weights of {job.parent[:10]}, which are missing")
        return models.read_weights(path, job.config["backbone"])
    if job.init_path:
        return models.read_weights(job.init_path, job.config["backbone"])
    if job.config["init"].startswith("timm:"):
        return models.imagenet_weights(job.config["backbone"])
    return None


def execute(job, store: Store, preset_name="", overrides=(), data_opts=None):
    """Run `job` to a record. A user error propagates (nothing is recorded: fix and re-run); a non-finite loss
    leaves a failed record that says so; a signal leaves a checkpoint and no record.
    data_opts: root, skip_bad, cache_dir (see bench.data.load)."""
    data_opts = data_opts or {}
    cfg = job.config
    run_dir = store.run_dir(job.hash)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    except NonFiniteLoss as e:
        record.update(status="failed", error=str(e), metrics={})
    except (UserError, Interrupted):
        raise
    except Exception as e:  # a crash is a result too: say what it was and where
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                      metrics={})
    record.update(wall_time_s=round(time.time() - t0, 2),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    store.put(record)
    if record["status"] == "done":  # the record and weights.pt are the result; the optimiser state is dead weight
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record
