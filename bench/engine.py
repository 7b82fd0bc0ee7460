"""The one training loop, shared by every method and every stage.

data (resident or streamed: batches from data.feed) -> batched views -> model.loss -> AdamW -> per-iteration
warmup + cosine.
A checkpoint is written (atomically) every few minutes of wall time (`checkpoint_interval`), at the end and
when a stop is requested (the launcher turns its signals into `request_stop`), so a job resumes from where it
stopped, mid-epoch included; a JSON-lines metrics log sits beside it in the job's run directory. Inside a step
nothing waits for the device: the loss is summed and checked for NaN on the device and read once per epoch.
Under torch.distributed the same loop runs on every rank (see `fit`).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timm.layers import DropPath
from tqdm import tqdm

from bench.data import feed
from bench.data.views import make_views
from bench.errors import COMPILE_CHOICES, UserError
from bench.results import aside, read_tensors, write_durably


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

    def param_groups(self):
        """The optimiser's parameter groups. A group may set its own weight_decay; `ramp_weight_decay: False`
        keeps it out of a weight-decay schedule (cfg weight_decay_end)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def before_optimizer_step(self, epoch):
        """Last changes to the gradients (averaged and clipped) before the step (DINO's frozen last layer)."""

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


def momentum_copy(module):
    """A teacher or key encoder: a frozen copy of `module` without drop path or dropout, so that its targets are
    deterministic. DINO's reference builds its teacher with drop path 0 (main_dino.py) and MoCo v3's ViTs have
    none; BatchNorm layers stay as they are (the references' key encoders normalise with their own batches)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for p in twin.parameters():
        p.requires_grad = False
    return twin


def cosine_ramp(start, end, progress):
    """From `start` at progress 0 to `end` at progress 1 along a half cosine (momentum schedules)."""
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """A signal asked the job to stop: during training, once a checkpoint was saved; before it (`saved=False`:
    waiting for another run's lock), at once."""

    def __init__(self, signum, saved=True):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}" + ("; checkpoint saved" if saved else ""))
        self.signum, self.saved = signum, saved


def device():
    """Where this process trains: $BENCH_DEVICE when set (cpu, cuda, cuda:1), else the rank's GPU, else CPU."""
    raw = os.environ.get("BENCH_DEVICE")
    if raw:
        try:
            dev = torch.device(raw)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UserError(f"BENCH_DEVICE={raw}: expected cpu, cuda or cuda:N")
        n = torch.cuda.device_count() if dev.type == "cuda" else 0
        if dev.type == "cuda" and (dev.index or 0) >= n:  # else a failed record per job, its children not run
            raise UserError(f"BENCH_DEVICE={raw}: torch sees {n or 'no'} GPU{'s' * (n != 1)} here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def place(model, dev):
    """`model` on `dev`, with the attention kernel that is fastest there: on CPU, timm's explicit softmax(q k^T) v
    rather than scaled_dot_product_attention, whose CPU kernels are slower at these small sizes (the demo's
    pretraining step: 63 -> 46 ms on 2 cores); the same function, to float rounding."""
    model.to(dev)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = dev.type != "cpu"
    return model


def compiles(dev):
    """Whether `fit` compiles the backbone (torch.compile): BENCH_COMPILE (`bench run --compile`) on, off or auto,
    the default: on a GPU, where DeiT-Tiny's forward and backward ran 1.9x faster compiled (16,700 against 8,700
    images/s on an H200), and not on a CPU, where compiling costs more than the demo's whole jobs."""
    raw = os.environ.get("BENCH_COMPILE", "auto")
    if raw not in COMPILE_CHOICES:
        raise UserError(f"BENCH_COMPILE={raw}: expected one of {', '.join(COMPILE_CHOICES)}")
    return raw == "on" or (raw == "auto" and dev.type == "cuda")


def compile_backbone(model: "Method", dev):
    """The method's student backbone compiled in place (nn.Module.compile: the same parameters and state_dict keys,
    so checkpoints and exported weights do not change) when `compiles(dev)`; heads, losses and momentum copies
    stay eager. A graph dynamo cannot compile runs eagerly instead of failing the job. Returns whether it did."""
    if not compiles(dev):
        return False
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    model.encoder.compile()
    return True


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


LR_SCHEDULES = ("cosine", "official")
PRECISIONS = ("bf16", "fp32")


def runs_bf16(dev, precision):
    """Whether `precision: bf16` trains in bf16 autocast on `dev`: on a GPU. A CPU trains in fp32 whatever the
    recipe says: oneDNN's bf16 kernels made the demo's step 1.5x faster on a CPU with AVX512-BF16, but their
    results differ from run to run (PVT's pretrained weights did between identical runs, and a fine-tuning job
    from them went non-finite in one run of three), and CPU runs must repeat exactly. What ran is recorded with
    each job (metrics `precision`)."""
    return precision == "bf16" and dev.type == "cuda"


def autocast(dev, precision):
    """bf16 autocast where `precision` runs as bf16 on `dev`; autocast("fp32") keeps a region in fp32 inside one."""
    if not torch.amp.is_autocast_available(dev.type):  # a device autocast does not know (meta): nothing to switch
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=runs_bf16(dev, precision))


def lr_factor(step, warmup_steps, total_steps, schedule="cosine"):
    """Linear warmup from 0, then cosine to 0, per iteration.

    schedule "official": the official scripts' formula as written, 0.5 * (1 + cos((pi * cur - w) / (E - w))) in
    epochs (parentheses misplaced: pi multiplies cur alone), which is the same ratio in steps. Its mean lr is 0.93
    of the cosine's at 200 epochs / 10 warm-up, 0.87 at 100 / 10 (0.99 and 0.97 with 2 warm-up epochs), and it
    rises again over the last epochs."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    if schedule == "official":
        return 0.5 * (1 + math.cos((math.pi * step - warmup_steps) / span))
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))


# "Stop soon and save": a launcher turns its signals (SIGTERM, SIGUSR2, Ctrl-C) into a request; the loop checks
# it after every step, saves a checkpoint and raises Interrupted. The engine knows nothing about SLURM.
_stop_requested: list[int] = []


def request_stop(signum=signal.SIGTERM):
    _stop_requested.append(signum)


def stop_requested():
    """The first signal that asked to stop since the requests were last cleared, or 0."""
    return _stop_requested[0] if _stop_requested else 0


def clear_stop_requests():
    _stop_requested.clear()


def _sync_flags(stop: bool, save: bool, bad):
    """Every rank must stop and save at the same step (a save gathers every rank's state), and a NaN on one rank
    stops them all (else: a deadlock). `bad` is a device flag; on one rank it is left on the device, unread."""
    if world_size() == 1:
        return stop, save, bad
    t = torch.cat([torch.tensor([float(stop), float(save)], device=device()), bad.float().view(1)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0]), bool(t[1]), t[2] > 0


def checkpoint_interval():
    """Seconds between time-based checkpoints (BENCH_CHECKPOINT_EVERY_S, default 300; `bench run
    --checkpoint-every`). A checkpoint is also written at the end of training and on a stop request."""
    raw = os.environ.get("BENCH_CHECKPOINT_EVERY_S") or "300"  # set but empty: unset
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"BENCH_CHECKPOINT_EVERY_S={raw}: expected a number of seconds > 0")
    return value


def _average_gradients(params):
    grads = [p.grad for p in params if p.grad is not None]
    if world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_each(params, max_norm):
    """Each parameter's gradient scaled to a norm of at most max_norm, on its own (DINO's utils.clip_gradients;
    not one global norm, as torch's clip_grad_norm_ computes)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


def _gather_ranks(mine):
    """Every rank's own state (its shard's permutation, running loss and generators), in rank order."""
    if world_size() == 1:
        return [mine]
    out = [None] * world_size()
    dist.all_gather_object(out, mine)
    return out


def shard(n, rank_, world):
    """The rows of an n-image training set this rank holds: every world-th one, the same count on every rank."""
    per_rank = n // world
    return torch.arange(rank_, per_rank * world, world)


def optimizer(model: Method, cfg: dict, dev):
    """AdamW over the method's parameter groups (fused: one kernel for all parameters, on CPU as on GPU), and the
    flat list of its parameters."""
    groups = model.param_groups()
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=dev.type in ("cuda", "cpu"))
    return opt, [p for g in groups for p in g["params"]]


def update(model: Method, opt, params, loss, cfg: dict, epoch: int, progress: float):
    """One optimiser update from `loss`: backward, gradients averaged over the ranks and clipped per parameter,
    the method's last changes, the weight-decay ramp, AdamW, the method's momentum updates (not the lr
    schedule: its owner steps it)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _average_gradients(params)
    if cfg.get("clip_grad"):
        clip_each(params, cfg["clip_grad"])
    model.before_optimizer_step(epoch)
    if cfg.get("weight_decay_end") is not None:
        for g in opt.param_groups:
            if g.get("ramp_weight_decay", True):
                g["weight_decay"] = cosine_ramp(cfg["weight_decay"], cfg["weight_decay_end"], progress)
    opt.step()
    model.after_step(progress)


def _data_signature(data) -> str:
    """What a checkpoint's permutation and step count were drawn for: the training set's size and its labels in
    order. No hash covers a `folder:` dataset's files or what --skip-bad left out, so images added or removed
    since a job stopped would otherwise resume it on rows that are not there any more, or are other images."""
    labels = data.labels.cpu().contiguous().numpy().tobytes()
    return f"{len(data)} images, labels {hashlib.sha256(labels).hexdigest()[:12]}"


def _readable_checkpoint(path: Path, model: Method, opt, dev, main: bool, data_sig: str):
    """The training checkpoint at `path`, or None: none there, or one that cannot be used (cut short, overwritten,
    not a checkpoint, another model's entries or shapes, another optimiser's parameter groups: loading would
    fail the job on every run; another training set, see _data_signature), which is kept aside and the job starts
    over. A file that cannot be read now (the file system's error, not its content's: a flaky network mount, no
    memory) fails the job and stays, so that a long job's progress is not thrown away on a passing fault. Read to
    the host: a checkpoint loaded straight onto the device would need the device's memory twice. Under several
    ranks, all resume or all start over."""
    ck = None
    if path.exists():
        try:
            ck = read_tensors(path)
            if not isinstance(ck, dict) or not {"model", "optimizer", "epoch", "step"} <= set(ck):
                raise ValueError("not a training checkpoint")
            own = model.state_dict()
            if set(ck["model"]) != set(own):  # written by a version whose model kept other state
                raise ValueError("its model's entries are not this model's")
            if any(getattr(v, "shape", None) != getattr(own[k], "shape", None) for k, v in ck["model"].items()):
                raise ValueError("its model's shapes are not this model's")
            if [len(g["params"]) for g in ck["optimizer"]["param_groups"]] != [len(g["params"])
                                                                               for g in opt.param_groups]:
                raise ValueError("its optimiser's parameter groups are not this optimiser's")
            if ck.get("data", data_sig) != data_sig:  # (a checkpoint of an earlier version has no signature)
                raise ValueError(f"it was written for another training set: {ck['data']}, now {data_sig}")
        except Exception as e:
            # EINVAL is torch's reader on a file cut short; the file system's other errors are passing faults
            if isinstance(e, MemoryError) or isinstance(e, OSError) and e.errno != errno.EINVAL:
                why = e.strerror if isinstance(e, OSError) else "out of memory"
                raise OSError(f"{path} cannot be read now ({why}); it is kept: run the job again to resume "
                              f"from it") from e
            if main:
                why = str(e) if isinstance(e, ValueError) else type(e).__name__
                aside(path, f"cannot be used ({why}); the job starts again from epoch 0")
            ck = None
    if world_size() > 1:
        flag = torch.tensor([float(ck is None)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ck = None if flag.item() else ck
    return ck


def checkpoint_position(path: Path):
    """(epoch, step) the training checkpoint at `path` resumes from, or None where there is none to read; its
    tensors are mapped, not read, so a status of many jobs does not load their weights."""
    try:
        ck = read_tensors(path, mmap=True)
        return int(ck["epoch"]), int(ck["step"])
    except Exception:
        return None


def _trim_log(path: Path, epoch: int):
    """Epochs logged after the checkpoint (or without one) are trained again: their lines go, as does a line cut
    short by a crash, with the rest."""
    if not path.exists():
        return

    def before(line):
        try:
            return json.loads(line).get("epoch", -1) < epoch
        except (ValueError, AttributeError):
            return False

    lines = path.read_text(errors="replace").splitlines()
    kept = [ln for ln in lines if before(ln)]
    if len(kept) != len(lines):
        write_durably(path, "".join(ln + "\n" for ln in kept))


def fit(model: Method, data, cfg: dict, run_dir: Path, desc: str = ""):
    """Train `model` on `data` for cfg['epochs']; resume from run_dir/checkpoint.pt when it exists.

    cfg: epochs, batch_size, lr, warmup_epochs, weight_decay, seed; optional weight_decay_end (cosine schedule
    of the weight decay, DINO), clip_grad (max gradient norm of each parameter) and drop_last (no partial last
    batch). Returns the last epoch's metrics.

    With torch.distributed initialised (several ranks), batch_size is the global batch: each rank holds its own
    shard of the training set, draws batch_size / ranks images of it per step, and the gradients are averaged.
    Losses that need the whole batch gather it themselves (see methods/). Rank 0 writes the checkpoint and the
    log; every rank's own state (permutation, running loss, generators) is in the checkpoint."""
    dev = device()
    rk, world = rank(), world_size()
    main = rk == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    place(model, dev)
    compiled = compile_backbone(model, dev)
    opt, params = optimizer(model, cfg, dev)
    rows = shard(len(data), rk, world) if world > 1 else torch.arange(len(data))
    n = len(rows)
    bs = min(cfg["batch_size"], len(data)) // world
    # every image every epoch: the official loaders keep the last partial batch (Flowers at 256: 8 steps, not 7);
    # a last batch of one image alone is dropped, since BatchNorm cannot train on it. drop_last: full batches
    # only, as the DINO and MoCo v3 references load them
    steps = n // bs + (not cfg.get("drop_last") and n % bs > 1)
    total = cfg["epochs"] * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, cfg["warmup_epochs"] * steps, total, cfg.get("lr_schedule", "cosine")))
    precision = "bf16" if runs_bf16(dev, cfg.get("precision", "bf16")) else "fp32"

    ckpt_path = run_dir / "checkpoint.pt"
    log_path = run_dir / "metrics.jsonl"
    for p in (ckpt_path, log_path):  # not ours to remove (it may hold something), and no retry will mend it
        if p.is_dir():
            raise UserError(f"{p}: a folder where a job's {p.name} belongs; move it away and run again")
    epoch, step, perm, last = 0, 0, None, {}
    loss_sum = torch.zeros((), device=dev)  # this epoch's, so far: a resumed epoch still logs its whole mean
    epoch_s, epoch_seen, earlier_s, session_t0 = 0.0, 0, 0.0, time.time()
    data_sig = _data_signature(data)
    ck = _readable_checkpoint(ckpt_path, model, opt, dev, main, data_sig)
    if ck is not None:
        if ck.get("world_size", 1) != world:  # --gpus-per-job is not in the hash: the user's to settle
            raise UserError(f"{ckpt_path} was written by {ck.get('world_size', 1)} processes, this run has "
                               f"{world}: resume with the same --gpus-per-job or delete the checkpoint")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        epoch, step, last = ck["epoch"], ck["step"], ck.get("metrics", {})
        # one entry per rank; a checkpoint of an earlier version kept the single rank's state at the top level
        mine = ck["ranks"][rk] if "ranks" in ck else {"perm": ck["perm"], "epoch_loss": 0.0, "cpu_rng": ck["rng"],
                                                      "cuda_rng": ck.get("cuda_rng")}
        perm = mine["perm"].to(dev)
        earlier_s = ck.get("elapsed_s", 0.0)
        if step:
            loss_sum += mine["epoch_loss"]
            epoch_s, epoch_seen = ck.get("epoch_s", 0.0), ck.get("epoch_seen", 0)
        torch.set_rng_state(mine["cpu_rng"].cpu())
        if dev.type == "cuda" and mine["cuda_rng"] is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"].cpu(), dev)
        if main and epoch < cfg["epochs"]:
            print(f"{desc}: resumed from epoch {epoch} step {step} of {cfg['epochs']} epochs ({ckpt_path})",
                  file=sys.stderr, flush=True)

    if main:
        _trim_log(log_path, epoch)

    def save(e, s):
        nonlocal saved_at
        saved_at = time.time()
        ranks = _gather_ranks({"perm": perm.cpu(), "epoch_loss": loss_sum.item(), "cpu_rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None})
        if main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": e, "step": s, "metrics": last, "ranks": ranks, "world_size": world,
                     "data": data_sig, "elapsed_s": earlier_s + saved_at - session_t0,
                     # the epoch so far, without a compilation: a session resuming it must not count that one
                     "epoch_s": saved_at - t0 - compiling_s if s else 0.0, "epoch_seen": seen - compiling_n if s else 0}
            write_durably(ckpt_path, lambda f: torch.save(state, f))
        if world > 1:  # no rank leaves (and perhaps takes the job down) before the checkpoint is on disk
            dist.barrier()

    source = feed(data, rows, dev)  # resident or streamed: batches of uint8 images on the device either way
    labels = data.labels.to(dev)
    model.train()
    bar = tqdm(total=total, initial=epoch * steps + step, desc=desc, unit="step", dynamic_ncols=True,
               file=sys.stderr, disable=None if main else True, leave=False)
    log = open(log_path, "a") if main else None
    every, saved_at = checkpoint_interval(), time.time()
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # a non-finite loss so far this epoch
    first_step_s = None  # this session's first step: with a compiled backbone, the compilation's cost

    def check_finite(where):
        if bool(bad):
            raise NonFiniteLoss(f"loss became non-finite {where}")

    try:
        while epoch < cfg["epochs"]:
            if step == 0:  # a fresh epoch: its own seed, so a resumed run draws the same crops
                torch.manual_seed(cfg["seed"] * 100_003 + epoch + 1_000_003 * rk)
                perm = torch.randperm(n, device=dev)
            model.start_epoch(epoch)
            t0, seen = time.time() - epoch_s, epoch_seen  # a resumed epoch counts its time before the stop
            epoch_s, epoch_seen = 0.0, 0
            compiling_s, compiling_n = 0.0, 0  # a compiled backbone's first step: not the epoch's pace
            batches = source.epoch(perm, step, steps, bs)
            while step < steps:
                # idx: the images' indices in the whole training set (IDMM's instance labels)
                step_t0 = time.time()
                idx, images, sizes = next(batches)
                progress = (epoch * steps + step) / total
                views = make_views(images, model.views, sizes)
                with autocast(dev, precision):
                    loss = model.loss(views, idx, labels[idx], progress)
                bad |= ~torch.isfinite(loss.detach())
                stop, due, bad = _sync_flags(bool(stop_requested()), main and time.time() - saved_at >= every, bad)
                if world > 1:  # the flags were read from the device anyway
                    check_finite(f"at epoch {epoch} step {step}")
                update(model, opt, params, loss, cfg, epoch, progress)
                sched.step()
                if first_step_s is None:
                    first_step_s = round(time.time() - step_t0, 3)
                    if compiled:
                        compiling_s, compiling_n = first_step_s, len(idx) * world
                step += 1
                seen += len(idx) * world
                loss_sum += loss.detach()
                bar.update()
                if stop or due:
                    check_finite(f"in epoch {epoch}")  # never save NaN weights
                    save(epoch, step)
                if stop:
                    raise Interrupted(stop_requested() or signal.SIGTERM)
            check_finite(f"in epoch {epoch}")
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            secs = time.time() - t0
            if seen > compiling_n:  # (an epoch of that one step alone has no other pace to give)
                secs, seen = secs - compiling_s, seen - compiling_n
            last = {"epoch": epoch, "loss": loss_sum.item() / max(1, steps), "lr": sched.get_last_lr()[0],
                    "seconds": round(secs, 3), "images_per_s": round(seen / max(secs, 1e-9), 1)}
            if main:
                log.write(json.dumps(last) + "\n")
                log.flush()
            bar.set_postfix(epoch=epoch, loss=f"{last['loss']:.3f}")
            epoch, step = epoch + 1, 0
            loss_sum = torch.zeros((), device=dev)
            if epoch == cfg["epochs"]:
                save(epoch, 0)  # the end: a finished job is not trained again
    finally:
        bar.close()
        if log:
            log.close()
    return {**last, "earlier_sessions_s": earlier_s, "precision": precision, "compiled": compiled,
            "first_step_s": first_step_s}


def training_metrics(last: dict) -> dict:
    """What a job's record keeps of `fit`'s result, whichever stage it trained."""
    return {"train_loss": last.get("loss"), "train_images_per_s": last.get("images_per_s"),
            "earlier_sessions_s": last.get("earlier_sessions_s", 0),
            **{k: last.get(k) for k in ("precision", "compiled", "first_step_s")}}


@torch.no_grad()
def predict(model, data, transform, batch_size=256, precision="bf16"):
    """(indices, predicted classes) over a split in order, resident or streamed; a streamed split read with
    --skip-bad leaves its unreadable files out of the indices."""
    dev = device()
    place(model, dev).eval()
    idx, out = [], []
    for i, images in feed(data, torch.arange(len(data)), dev).in_order(batch_size):
        # a backbone compiled for training evaluates eagerly: no second compilation for eval mode and this batch
        with autocast(dev, precision), torch.compiler.set_stance("force_eager"):
            out.append(model(transform(images)).argmax(1))
        idx.append(i)
    if not idx:  # a streamed split none of whose images read (--skip-bad): the caller's `kept` says so
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(idx).cpu(), torch.cat(out).cpu()  # read once at the end: no wait for the GPU per batch
