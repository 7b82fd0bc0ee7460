"""The supervised stage (fine-tuning, or training from random init) and the test-split evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from bench import data as datasets
from bench import models
from bench.data.views import cutmix, eval_view, mix_in_parts, mixed_cross_entropy, mixup
from bench.engine import Method, fit, predict, rank, training_metrics, world_size
from bench.errors import UserError
from bench.results import write_durably


class Classifier(Method):
    """Label-smoothed cross-entropy on mixed images: Mixup on even epochs, CutMix on odd ones (official main_deit.py),
    each part of the batch (mixing.parts: the authors' 4 GPUs) with its own lambda and permutation."""

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.epoch = 0

    def start_epoch(self, epoch):
        self.epoch = epoch

    def loss(self, views, index, label, progress):
        mixing = self.cfg["mixing"]
        if self.epoch % 2 == 0:
            mix = lambda x: mixup(x, mixing["mixup_alpha"])  # noqa: E731
        else:
            mix = lambda x: cutmix(x, mixing["cutmix_alpha"])  # noqa: E731
        x, perm, lam = mix_in_parts(views[0], 1, max(1, mixing["parts"] // world_size()), mix)
        return mixed_cross_entropy(self.logits(x), label, perm, lam, self.cfg["label_smoothing"])

    def logits(self, x):
        return self.encoder(x)  # a timm model with its classifier head


def top1(model, test, resolution, resize_ratio, precision="bf16"):
    idx, pred = predict(model, test, lambda x: eval_view(x, resolution, resize_ratio), precision=precision)
    return (pred == test.labels[idx]).float().mean().item()


def run(cfg: dict, run_dir: Path, init: dict | None, data_opts: dict):
    """Fine-tune from `init` (weights as models.export gives them) or from random init; test top-1."""
    res = cfg["resolution"]
    train, test = (datasets.load(cfg["data"], split, size, max_side=max_side, **data_opts)
                   for split, size, max_side in datasets.splits_of(cfg))
    if train.classes != test.classes:
        raise UserError(f"{cfg['data']}: train and test splits have different classes")
    torch.manual_seed(cfg["seed"])
    model = models.create(cfg["backbone"], res, len(train.classes), cfg["drop_path"], cfg["model_kwargs"])
    if init is not None:
        models.load_into(model, init, cfg["backbone"])
    last = fit(Classifier(model, cfg), train, cfg, run_dir, desc=f"finetune {cfg['data']} {res}px")
    if rank() != 0:  # rank 0 evaluates and writes the weights
        return {}
    weights = models.export(model, cfg["backbone"], res)
    write_durably(run_dir / "weights.pt", lambda f: torch.save(weights, f))
    accuracy = top1(model, test, res, cfg["eval_resize"], cfg["precision"])
    return {"top1": accuracy, **training_metrics(last), "train_size": train.kept("train"),
            "test_size": test.kept("test"), "data": {"train": train.meta, "test": test.meta}}
