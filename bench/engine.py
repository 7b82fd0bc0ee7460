"""The one training loop, shared by every method and every stage.

data (a decoded ImageSet) -> batched views -> model.loss -> AdamW -> per-iteration warmup + cosine.
A checkpoint is written (atomically) after every epoch and when SIGTERM / SIGUSR2 / Ctrl-C arrives, so a job
resumes from where it stopped; a JSON-lines metrics log sits beside it in the job's run directory.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from bench.data.views import make_views


class Method(torch.nn.Module):
    """What differs between pretraining methods: heads, loss, views, momentum state. Not the loop."""

    pretrains = True
    summary = ""
    defaults_source = ""

    def __init__(self, backbone, cfg):
        super().__init__()
        self.encoder = backbone
        self.cfg = cfg

    @property
    def views(self):
        return self.cfg["views"]

    def loss(self, views, index, label, progress):
        raise NotImplementedError

    def start_epoch(self, epoch):
        """Per-epoch switches (e.g. Mixup on even epochs, CutMix on odd ones)."""

    def after_step(self, progress):
        """Momentum and centre updates."""

    def backbone(self):
        return self.encoder

    def embed(self, views, encoder=None):
        """Features of all crops of all groups, in view order; crops of one size share one forward pass."""
        encoder = encoder or self.encoder
        sizes = sorted({v.shape[-1] for v in views})
        if len(sizes) == 1:
            return encoder(torch.cat(views))
        feats = {s: encoder(torch.cat([v for v in views if v.shape[-1] == s])) for s in sizes}
        out, used = [], dict.fromkeys(sizes, 0)
        for v in views:
            s = v.shape[-1]
            out.append(feats[s][used[s]:used[s] + len(v)])
            used[s] += len(v)
        return torch.cat(out)


def cosine_ramp(start, end, progress):
    """From `start` at progress 0 to `end` at progress 1 along a half cosine (momentum schedules)."""
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """A signal asked the job to stop; a checkpoint was saved first."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint saved")
        self.signum = signum


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_factor(step, warmup_steps, total_steps):
    """Linear warmup from 0, then cosine to 0, per iteration."""
    if step < warmup_steps:
        return step / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextmanager
def _stop_requests():
    """Turn SIGTERM / SIGUSR2 / SIGINT into a flag the loop checks after each step."""
    flag = []
    sigs = [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT]
    try:
        old = {s: signal.signal(s, lambda signum, _frame: flag.append(signum)) for s in sigs}
    except ValueError:  # not the main thread: no handlers, no graceful stop
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def fit(model: Method, data, cfg: dict, run_dir: Path, desc: str = ""):
    """Train `model` on `data` for cfg['epochs']; resume from run_dir/checkpoint.pt when it exists.

    cfg: epochs, batch_size, lr, warmup_epochs, weight_decay, seed; optional weight_decay_end (cosine schedule
    of the weight decay, DINO) and clip_grad (max gradient norm). Returns the last epoch's metrics."""
    dev = device()
    run_dir.mkdir(parents=True, exist_ok=True)
    model.to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"], fused=dev.type == "cuda")
    n = len(data)
    bs = min(cfg["batch_size"], n)
    steps = n // bs  # drop the last partial batch, as the official DataLoaders do
    total = cfg["epochs"] * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, cfg["warmup_epochs"] * steps, total))

    ckpt_path = run_dir / "checkpoint.pt"
    epoch, step, perm, last = 0, 0, None, {}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        epoch, step, perm, last = ck["epoch"], ck["step"], ck["perm"], ck.get("metrics", {})
        torch.set_rng_state(ck["rng"])
        if dev.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"])

    def save(e, s):
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "epoch": e, "step": s, "perm": perm, "metrics": last, "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state() if dev.type == "cuda" else None}, ckpt_path)

    images, labels = data.images.to(dev), data.labels.to(dev)
    model.train()
    bar = tqdm(total=total, initial=epoch * steps + step, desc=desc, unit="step", dynamic_ncols=True,
               file=sys.stderr, disable=None, leave=False)
    log = open(run_dir / "metrics.jsonl", "a")
    try:
        with _stop_requests() as stop:
            while epoch < cfg["epochs"]:
                if step == 0:  # a fresh epoch: its own seed, so a resumed run draws the same crops
                    torch.manual_seed(cfg["seed"] * 100_003 + epoch)
                    perm = torch.randperm(n, device=dev)
                model.start_epoch(epoch)
                t0, seen, loss_sum = time.time(), 0, 0.0
                while step < steps:
                    idx = perm[step * bs:(step + 1) * bs]
                    progress = (epoch * steps + step) / total
                    views = make_views(images[idx], model.views)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        loss = model.loss(views, idx, labels[idx], progress)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch} step {step}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.get("clip_grad"):
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                    if cfg.get("weight_decay_end") is not None:
                        for g in opt.param_groups:
                            g["weight_decay"] = cosine_ramp(cfg["weight_decay"], cfg["weight_decay_end"], progress)
                    opt.step()
                    sched.step()
                    model.after_step(progress)
                    step += 1
                    seen += len(idx)
                    loss_sum += loss.item()
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
                    if stop:
                        save(epoch, step)
                        raise Interrupted(stop[0])
                secs = time.time() - t0
                last = {"epoch": epoch, "loss": loss_sum / max(1, steps), "lr": sched.get_last_lr()[0],
                        "seconds": round(secs, 3), "images_per_s": round(seen / max(secs, 1e-9), 1)}
                log.write(json.dumps(last) + "\n")
                log.flush()
                epoch, step = epoch + 1, 0
                save(epoch, 0)
    finally:
        bar.close()
        log.close()
    return last


@torch.no_grad()
def predict(model, images, transform, batch_size=256):
    dev = device()
    model.to(dev).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = transform(images[i:i + batch_size].to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(model(x).float().argmax(1).cpu())
    return torch.cat(out)
