"""`bench benchmark`: training throughput, measured three ways on one machine in one run.

(a) official-style: the authors' kind of pipeline, PIL decoding and torchvision transforms of every crop in a
    DataLoader with a worker per core, feeding the same model step; (b) this project end to end: decode once,
    then `engine.fit` for a few epochs, every per-epoch cost (checkpoints, logging, seeding) included; (c) the
    training step alone on views made in advance. For IDMM and every baseline on DeiT-Tiny, IDMM on each other
    backbone, and fine-tuning on each backbone; then the device-hours each paper table implies at rate (b).
    Then (b) of DeiT-Tiny fine-tuning with the split streamed from its files, decoded by PIL or on the device.
The images are JPEGs it writes itself, of Flowers' size (500 px on the shorter side, 3:4).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import data as datasets
from bench import engine, models
from bench import plan as planner
from bench.data.views import IMAGENET_MEAN, IMAGENET_STD, make_views
from bench.finetune import Classifier
from bench.errors import UserError
from bench.results import hardware, versions, write_durably
from methods import METHODS

BASELINES = ["idmm", "simclr", "supcon", "mocov2", "mocov3", "dino"]
BACKBONES = ["deit_tiny_patch16_224", "deit_base_patch16_224", "pvt_v2_b0", "pvt_v2_b3", "t2t_vit_7"]
ROWS = ([(f"pretrain {m} {BACKBONES[0]}", {"method": m, "backbone": BACKBONES[0]}) for m in BASELINES]
        + [(f"pretrain idmm {b}", {"method": "idmm", "backbone": b}) for b in BACKBONES[1:]]
        + [(f"finetune {b} 224", {"method": "random", "backbone": b}) for b in BACKBONES])
STREAMED = {f"streamed {BACKBONES[0]} 224 {decoder}": decoder for decoder in ("pil", "device")}  # row: decoder
LABELS = [label for label, _ in ROWS] + list(STREAMED)  # what --only matches against


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0):
    """n JPEGs of 500 x 667 (or 667 x 500) px, smooth colour fields with shapes, as folder:root with a train split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:667, 0:500] / 500
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3))
        a = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * yy for k in range(3)], -1) % 255
        y0, x0 = rng.integers(0, 400), rng.integers(0, 300)
        a[y0:y0 + 200, x0:x0 + 150] = rng.uniform(0, 255, 3)
        a = a + rng.normal(0, 8, a.shape)
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        if i % 3 == 0:
            img = img.transpose(Image.Transpose.ROTATE_90)
        path = root / "train" / f"c{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    for k in range(classes):
        (root / "test" / f"c{k}").mkdir(parents=True, exist_ok=True)


def _official_transform(views):
    """The torchvision pipeline that makes one image's crops the way the official loaders do (per crop group:
    RandomResizedCrop bicubic, flip, jitter, greyscale, blur, solarise; RandAugment where the recipe has it)."""
    import torchvision.transforms as T

    def group(g):
        spec = {**views, **g}
        steps = [T.RandomResizedCrop(g["size"], scale=tuple(g["scale"]), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomHorizontalFlip(spec.get("flip", 0.0))]
        if spec.get("jitter") and spec.get("jitter_p", 0):
            steps.append(T.RandomApply([T.ColorJitter(*spec["jitter"])], p=spec["jitter_p"]))
        if spec.get("grayscale_p", 0):
            steps.append(T.RandomGrayscale(spec["grayscale_p"]))
        if spec.get("randaugment"):
            steps.append(T.RandAugment(num_ops=spec["randaugment"]["ops"], magnitude=9))
        if spec.get("blur_p", 0):
            sigma = tuple(spec["blur_sigma"])
            steps.append(T.RandomApply([T.GaussianBlur(2 * int(3 * sigma[1]) + 1, sigma)], p=spec["blur_p"]))
        if spec.get("solarize_p", 0):
            steps.append(T.RandomSolarize(128, p=spec["solarize_p"]))
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return g["count"], T.Compose(steps)

    return [group(g) for g in views["crops"]]


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, views):
        self.files, self.groups = files, _official_transform(views)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            return [torch.stack([t(im) for _ in range(count)]) for count, t in self.groups], i


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_waits(dev, fn):
    """How many times `fn` made the host wait for the GPU (CUDA's sync debug mode warns at each); None elsewhere.
    A wait inside a step keeps the host from preparing the next step while the GPU runs this one."""
    if dev.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def profile_steps(dev, fn, steps, path, what="step"):
    """torch.profiler over `steps` calls of `fn` (whole steps, views included): the operators that took the most
    device time and the most host time, written to `path`, for the question a missed target leaves (what is
    left?). Returns the wall time a step and, on a GPU, how much of it the GPU was busy (kernels and copies): a
    busy share well below 1 says the host, not the GPU, sets the pace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    if cuda:  # detach CUPTI when the profile ends: left attached it slows the GPU work measured after it
        os.environ.setdefault("TEARDOWN_CUPTI", "1")
    else:  # kineto's lines without a GPU are noise on stderr (trace markers, "gpuGetDeviceCount failed")
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    _sync(dev)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        wall_ms = (time.perf_counter() - t) * 1e3 / steps
    busy_ms = None
    if cuda:  # the union of the kernels' and copies' intervals (streams overlap; annotations span kernels)
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        busy_us, reach = 0, None
        for start, end in spans:
            if reach is None or start > reach:
                busy_us, reach = busy_us + end - start, end
            elif end > reach:
                busy_us, reach = busy_us + end - reach, end
        busy_ms = busy_us / 1e3 / steps
    table = prof.key_averages()
    text = [f"{steps} x {what}, {wall_ms:.2f} ms each under the profiler"
            + (f", the GPU busy {busy_ms:.2f} ms of it" if cuda else "")]
    if cuda:
        text += ["by device time", table.table(sort_by="self_device_time_total", row_limit=30)]
    text += ["by host time", table.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(text) + "\n")
    return {"steps": steps, "wall_ms": round(wall_ms, 3), "gpu_busy_ms": busy_ms and round(busy_ms, 3),
            "file": str(path)}


def _step_fn(model, cfg, dev):
    """The engine's own step (its optimiser and update), without the loop around it."""
    opt, params = engine.optimizer(model, cfg, dev)

    def step(views, index, labels):
        with engine.autocast(dev, cfg["precision"]):
            loss = model.loss(views, index, labels, 0.5)
        engine.update(model, opt, params, loss, cfg, 1, 0.5)
    return step


def _build(cfg, train):
    if cfg["stage"] == "pretrain":
        backbone = models.create(cfg["backbone"], cfg["resolution"], 0, cfg["drop_path"], cfg["model_kwargs"])
        return METHODS[cfg["method"]](backbone, backbone.num_features, len(train), len(train.classes),
                                      cfg["method_cfg"])
    net = models.create(cfg["backbone"], cfg["resolution"], len(train.classes), cfg["drop_path"], cfg["model_kwargs"])
    model = Classifier(net, cfg)
    model.start_epoch(1)  # CutMix epochs (even ones mix up): the costlier of the two
    return model


def _views_of(cfg):
    return cfg["method_cfg"]["views"] if cfg["stage"] == "pretrain" else cfg["views"]


def measure(cfg, train, files, dev, steps, epochs, profile_to=None):
    """Images/s of (a), (b), (c) for one job config on the decoded `train` (and its `files`); with `profile_to`
    (a file), a profile of a few whole steps too."""
    bs = min(cfg["batch_size"], len(train))
    out = {}
    # (c) the step alone: the same batch's views, made once, on the device
    torch.manual_seed(0)
    model = engine.place(_build(cfg, train), dev).train()
    engine.compile_backbone(model, dev)
    step = _step_fn(model, cfg, dev)
    imgs, sizes = train.images[:bs].to(dev), train.sizes[:bs].to(dev)
    index, labels = torch.arange(bs, device=dev), train.labels[:bs].to(dev)
    views = make_views(imgs, _views_of(cfg), sizes)
    step(views, index, labels)  # warm-up (allocations, kernels)
    _sync(dev)
    # a whole step, its views included: on a GPU, how often it waits for the device (0 where none is needed)
    whole = lambda: step(make_views(imgs, _views_of(cfg), sizes), index, labels)  # noqa: E731
    out["host_waits"] = host_waits(dev, whole)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step(views, index, labels)
    _sync(dev)
    out["step_alone"] = round(bs * steps / (time.perf_counter() - t), 1)
    # (a) official-style: PIL + torchvision in a DataLoader with a worker per core
    loader = torch.utils.data.DataLoader(_Files(files, _views_of(cfg)), batch_size=bs, shuffle=True,
                                         num_workers=os.cpu_count() or 1, drop_last=True)
    def forever():  # epochs after epochs, as training does (a new epoch restarts the workers, as it did there)
        while True:
            yield from loader

    batches, n, t = forever(), 0, None
    for k in range(steps + 1):
        crops, idx = next(batches)
        group_views = [g.to(dev).transpose(0, 1).reshape(-1, *g.shape[2:]) for g in crops]  # crop-major
        step(group_views, idx.to(dev), train.labels[idx].to(dev))
        if k == 0:  # the first batch pays for starting the workers
            _sync(dev)
            t = time.perf_counter()
        else:
            n += len(idx)
    _sync(dev)
    out["official_style"] = round(n / (time.perf_counter() - t), 1)
    del batches, loader
    # (b) this project end to end: engine.fit for `epochs`, every per-epoch cost included
    out.update(end_to_end(cfg, train, dev, epochs))
    out["b_over_a"] = round(out["end_to_end"] / out["official_style"], 2)
    out["b_over_c"] = round(out["end_to_end"] / out["step_alone"], 2)
    if profile_to is not None:  # after the row's timings, which the profiler would slow
        out["profile"] = profile_steps(dev, whole, min(steps, 5), profile_to)
    return out


def end_to_end(cfg, train, dev, epochs):
    """(b): images/s of `engine.fit` for `epochs` on `train` (resident or streamed), every per-epoch cost
    included; a compiled backbone's first step is reported apart (`compile_s`), as it is paid once per job."""
    torch.manual_seed(0)
    model = _build(cfg, train)
    with tempfile.TemporaryDirectory() as tmp:
        run = {**cfg, "epochs": epochs, "warmup_epochs": 0}
        t = time.perf_counter()
        last = engine.fit(model, train, run, Path(tmp), desc="benchmark")
        _sync(dev)
        wall, seen = time.perf_counter() - t, len(train) * epochs
        first = min(cfg["batch_size"], len(train))
        if last["compiled"] and seen > first:  # (with a single step there is nothing else to time)
            wall, seen = wall - last["first_step_s"], seen - first
        logged = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    out = {"end_to_end": round(seen / wall, 1), "epoch_wall_s": round(wall / epochs, 3),
           "inside_epochs": round(sum(m["images_per_s"] for m in logged) / len(logged), 1)}
    if last["compiled"]:
        out["compile_s"] = last["first_step_s"]  # the first step, its compilation included
    return out


IMAGENET_TRAIN = 1_281_167


def streamed(configs, measured, resident, data, dev, epochs, only, say, profile_dir=None):
    """(row, measurement) pairs: (b) of DeiT-Tiny fine-tuning at 224 on the same JPEGs streamed (read a batch at
    a time, decoded by PIL in the workers or by torchvision on the device), against the same split resident;
    with the minutes one epoch of ImageNet's training split would take at that rate. With `profile_dir`, a
    profile of one whole epoch of each (the reading is what differs from a resident split's step)."""
    label = f"finetune {BACKBONES[0]} 224"
    cfg, base = configs[label], measured.get(label, {}).get("end_to_end")
    for row, decoder in STREAMED.items():
        if only and not any(o in row for o in only):
            continue
        if base is None:
            base = end_to_end(copy.deepcopy(cfg), resident(cfg["max_side"]), dev, epochs)["end_to_end"]
        split = datasets.load(data, "train", 256, max_side=cfg["max_side"], stream=True, decode=decoder)
        r = end_to_end(copy.deepcopy(cfg), split, dev, epochs)
        r.update(resident=base, of_resident=round(r["end_to_end"] / base, 2), workers=split.workers,
                 decoder=split.meta["decoder"], imagenet_epoch_min=round(IMAGENET_TRAIN / r["end_to_end"] / 60, 1))
        if profile_dir is not None:
            r["profile"] = profile_steps(dev, lambda: end_to_end(copy.deepcopy(cfg), split, dev, 1), 1,
                                         profile_dir / f"{row.replace(' ', '-')}.txt",
                                         "epoch (the job's start included: its model built, and compiled where it is)")
        say(f"  {row:40s} (b) {r['end_to_end']:>8} images/s, {r['of_resident']} of resident ({base}),"
            f" {r['decoder']}; an ImageNet epoch {r['imagenet_epoch_min']} min")
        yield row, r


def _configs(preset, data):
    """(label, job config) for every measured combination."""
    configs = []
    for label, row in ROWS:
        row = {**row, "id": label, "pretrain_epochs": 1}
        if label.startswith("pretrain"):
            cfg = planner._pretrain_config(row, preset, data, 0)
        else:
            cfg = planner._finetune_config(row, preset, data, {"res": 224, "epochs": 1}, "random", 0)
        configs.append((label, cfg))
    return configs


def _rate(c, rates, base):
    """(images/s, how it was estimated or None) of a job at the end-to-end rates measured, or (None, None).
    `base`: the resolution the preset trains the table's 224 px stages at, the one fine-tuning was measured at."""
    b, m = c["backbone"], c.get("method")
    ft = rates.get(f"finetune {b} 224")
    if c["stage"] != "pretrain":
        if c["resolution"] == base or not ft:
            return ft, None
        return ft * (base / c["resolution"]) ** 2, (f"finetune {b} {c['resolution']} px at its {base} px rate"
                                                     f" over the tokens' ratio")
    if f"pretrain {m} {b}" in rates:
        return rates[f"pretrain {m} {b}"], None
    if m == "supervised" and ft:  # the fine-tuning step on the pretraining set, on crops no larger than 224
        return ft, f"pretrain {m} {b} at its {base} px fine-tuning rate (an upper bound on its time)"
    tiny, ours, ours_tiny = (rates.get(f"pretrain {m} {BACKBONES[0]}"), rates.get(f"pretrain idmm {b}"),
                             rates.get(f"pretrain idmm {BACKBONES[0]}"))
    if tiny and ours and ours_tiny:
        return tiny * ours / ours_tiny, f"pretrain {m} {b} as {m} on {BACKBONES[0]} scaled by idmm's ratio"
    return None, None


def implied_hours(preset, rates, streamed=None):
    """Device-hours of every paper table under `preset` at the end-to-end rates measured. A job whose rate was
    not measured is estimated from rates that were, and named under `estimated` with its share of the hours,
    or left out and named under `not_counted`. A split that would be streamed (ImageNet's) runs at `streamed`
    times the rate: the share of the resident rate that streaming DeiT-Tiny's fine-tuning kept."""
    out, base = {}, preset["finetune"]["resolution"].get(224, 224)
    for name in planner.load_tables():
        seconds, guessed, missing, estimated, slowed = 0.0, 0.0, set(), set(), False
        for job in planner.plan(name, preset):
            c = job.config
            if job.skip:  # a job that will not run (a pretraining set nobody defined): no hours
                continue
            if c["data"] not in datasets.DATASETS:  # a folder of one's own: how many images is not known here
                missing.add(f"{c['stage']} on {c['data']} (of unknown size)")
                continue
            rate, how = _rate(c, rates, base)
            if not rate:
                missing.add(" ".join(str(x) for x in (c["stage"], c.get("method"), c["backbone"], c["resolution"]) if x))
                continue
            n = datasets.DATASETS[c["data"]].train
            (_, size, max_side), *_ = datasets.splits_of(c)  # the training split's
            if streamed and datasets.data_path(n, size, max_side) == "streamed":
                rate, slowed = rate * streamed, True
            took = n * c["epochs"] / rate
            seconds += took
            if how:
                guessed += took
                estimated.add(how)
        out[name] = {"hours": round(seconds / 3600, 2) if seconds else None,
                     **({"estimated": sorted(estimated), "estimated_hours": round(guessed / 3600, 2)}
                        if estimated else {}),
                     **({"not_counted": sorted(missing)} if missing else {}),
                     **({"streamed_at": streamed} if slowed else {})}
    return out


def _some(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more (in the JSON)" if len(names) > shown else "")


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(device: str, preset_name: str, images: int, steps: int, epochs: int, out: Path, only=None, say=print,
        profile_dir: Path | None = None):
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.setdefault("BENCH_CHECKPOINT_EVERY_S", "300")
    preset = planner.load_preset(preset_name)
    hw = {**hardware(), "cpu": _cpu_name(), "device": str(dev),
          "bf16": engine.runs_bf16(dev, "bf16"),  # whether the recipe's precision: bf16 runs as bf16 here
          "compiled": engine.compiles(dev)}
    if dev.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(dev)
    say(f"bench benchmark: preset {preset['name']}, {images} images of 500x667, device {dev}"
        f" ({hw.get('gpu', hw['cpu'])}{', bf16' if hw['bf16'] else ', fp32 only'}"
        f"{', backbones compiled' if hw['compiled'] else ''}), {hw['cpus']} CPUs,"
        f" torch {torch.__version__}")
    results = {"hardware": hw, "versions": versions(), "preset": preset["name"], "images": images,
               "steps": steps, "epochs": epochs, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}

    def save():  # after every row: a run cut short keeps what it measured
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_durably(out, json.dumps(results, indent=1))
        except OSError as e:
            raise UserError(f"--out {out}: cannot write the measurements ({e.strerror})") from None

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_jpegs(root, images)
        data = f"folder:{root}"
        files = datasets.split_files(data, "train")[0]
        say(f"  wrote {images} JPEGs in {time.perf_counter() - t:.1f} s")
        decoded = {}

        def resident(side):
            if side not in decoded:
                t = time.perf_counter()
                decoded[side] = datasets.load(data, "train", 256, max_side=side)
                say(f"  decoded the split once (max side {side}) in {time.perf_counter() - t:.1f} s")
            return decoded[side]

        prev = os.environ.get("BENCH_DEVICE")
        os.environ["BENCH_DEVICE"] = str(dev)  # the engine trains where the benchmark was told to
        try:
            configs = _configs(preset, data)
            for label, cfg in configs:
                if only and not any(o in label for o in only):
                    continue
                r = measure(copy.deepcopy(cfg), resident(cfg["max_side"]), files, dev, steps, epochs,
                            profile_dir / f"{label.replace(' ', '-')}.txt" if profile_dir else None)
                r["resolution"] = cfg["resolution"]  # what it trained at: the demo's "224" stage is 24 px
                results["runs"][label] = r
                save()
                say(f"  {label:40s} {cfg['resolution']:>3} px (a) {r['official_style']:>8} (b) {r['end_to_end']:>8} (c) {r['step_alone']:>8}"
                    f" images/s   b/a {r['b_over_a']}  b/c {r['b_over_c']}  epoch {r['epoch_wall_s']} s"
                    + (f"  compile {r['compile_s']} s" if "compile_s" in r else "")
                    + (f"  host waits/step {r['host_waits']}" if r["host_waits"] is not None else "")
                    + (f"  GPU busy {r['profile']['gpu_busy_ms']} of {r['profile']['wall_ms']} ms a step"
                       if r.get("profile", {}).get("gpu_busy_ms") is not None else ""))
            for row, r in streamed(dict(configs), results["runs"], resident, data, dev, epochs, only, say,
                                   profile_dir):
                results["runs"][row] = r
                save()
        finally:
            if prev is None:
                os.environ.pop("BENCH_DEVICE")
            else:
                os.environ["BENCH_DEVICE"] = prev
    rates = {k: v["end_to_end"] for k, v in results["runs"].items()}
    streams = [v for k, v in results["runs"].items() if k in STREAMED]
    for v in streams:  # the resident fine-tuning a streamed row measured beside itself
        rates.setdefault(f"finetune {BACKBONES[0]} 224", v["resident"])
    # the faster of the two streamed paths: the one a user would pick (data.decode) for a streamed split
    kept = max((v["of_resident"] for v in streams), default=None)
    results["implied_hours"] = implied_hours(preset, rates, kept)
    for name, v in results["implied_hours"].items():
        if v["hours"] is None:
            say(f"  table {name:10s} not measured: no job of it has a rate (b)"
                + (" (--only left its rows out)" if only else ""))
            continue
        notes = ([f"{v['estimated_hours']} of them estimated: {_some(v['estimated'])}"]
                 if v.get("estimated") else []) + (
            [f"not counted: {_some(v['not_counted'])}"] if v.get("not_counted") else []) + (
            [f"streamed splits at {v['streamed_at']} of the resident rate"] if v.get("streamed_at") else [])
        say(f"  table {name:10s} {v['hours']:>9} device-hours at rate (b)"
            + (f" ({'; '.join(notes)})" if notes else ""))
    save()
    say(f"  written to {out}")
    return results
