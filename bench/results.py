"""The result store: one JSON record per finished (or failed) job, named by the job's config hash.

    DIR/<hash>.json          the record (written to a temporary name, then renamed)
    DIR/runs/<hash>/         checkpoint.pt, metrics.jsonl, weights.pt (what the next stage loads),
                             launch.json (where the job was last sent: launcher, SLURM id, log paths)
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


class Store:
    def __init__(self, root):
        self.root = Path(root)

    def path(self, h):
        return self.root / f"{h}.json"

    def run_dir(self, h):
        return self.root / "runs" / h

    def weights(self, h):
        return self.run_dir(h) / "weights.pt"

    def get(self, h):
        try:
            return json.loads(self.path(h).read_text())
        except FileNotFoundError:
            return None

    def records(self):
        if not self.root.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))]

    def put(self, record):
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(record["hash"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def put_launch(self, h, info):
        path = self.run_dir(h) / "launch.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".launch.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)

    def launch(self, h):
        try:
            return json.loads((self.run_dir(h) / "launch.json").read_text())
        except FileNotFoundError:
            return None

    def state(self, h):
        """done / failed / partial (a checkpoint exists) / pending."""
        rec = self.get(h)
        if rec is not None:
            return rec["status"]
        return "partial" if (self.run_dir(h) / "checkpoint.pt").exists() else "pending"


def hardware():
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("bench", "torch", "torchvision", "timm", "lightly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
