"""DINO (Caron et al., 2021): self-distillation from a momentum teacher with a centred, sharpened target."""
import warnings

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum

from bench.engine import Method, autocast, cosine_ramp, momentum_copy


class DINO(Method):
    summary = "self-distillation: student on all crops, EMA teacher on the 2 global crops, centring"
    defaults_source = "authors' DINO_exp (2 global + 2 local crops at 112, out 65536, teacher T 0.04, m 0.996 -> 1)"
    choices = {"export": ("teacher", "student")}

    @staticmethod
    def check(cfg):
        """The plan's check of settings no rule of one value can judge: the teacher sees the first global_crops
        crop groups, a crop each, of one size (else a failure at the first step, after the data was read)."""
        n, groups = cfg["global_crops"], cfg["views"]["crops"]
        first = groups[:n]
        if len(first) < n or any(g["count"] != 1 for g in first) or len({g["size"] for g in first}) > 1:
            return (f"global_crops is {n}: the first {n} crop groups must be a crop each, of one size (the "
                    f"teacher's views); the views have {len(groups)} groups")
        return None

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        with warnings.catch_warnings():  # lightly's head still uses torch's deprecated weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            dims = feature_dim, cfg["hidden_dim"] or feature_dim, cfg["bottleneck_dim"], cfg["out_dim"]
            self.head = DINOProjectionHead(*dims, freeze_last_layer=cfg["freeze_last_layer"])
            self.teacher_head = DINOProjectionHead(*dims)
        self.teacher = momentum_copy(backbone)
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_head.requires_grad_(False)
        # the centre is a buffer of the loss: it lives in the state dict, hence in every checkpoint; lightly
        # averages each batch's centre over the ranks of a multi-GPU job
        self.criterion = DINOLoss(output_dim=cfg["out_dim"], center_momentum=cfg["center_momentum"])

    def param_groups(self):
        """As the reference's utils.get_params_groups: biases and 1-D parameters (norms) without weight decay,
        and outside the weight-decay ramp, which main_dino.py applies to the first group only."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "ramp_weight_decay": False}]

    def before_optimizer_step(self, epoch):
        self.head.cancel_last_layer_gradients(epoch)  # the first freeze_last_layer epochs: no update at all

    def backbone(self):
        """The weights fine-tuning starts from: the student's (`export: student`), as the authors' DINO_exp saves
        them for main_deit.py, or the teacher's, as the DINO paper's evaluation loads them (--checkpoint_key
        teacher)."""
        return self.teacher if self.cfg["export"] == "teacher" else self.encoder

    def teacher_temp(self, progress):
        """Linear warmup from warmup_teacher_temp to teacher_temp over the first warmup fraction of training."""
        c = self.cfg
        frac = min(1.0, progress / c["warmup_teacher_temp_frac"]) if c["warmup_teacher_temp_frac"] else 1.0
        return c["warmup_teacher_temp"] + frac * (c["teacher_temp"] - c["warmup_teacher_temp"])

    def loss(self, views, index, label, progress):
        n_global = self.cfg["global_crops"]
        b = len(index)
        student = self.head(self.embed(views)).chunk(sum(len(v) for v in views) // b)  # global crops first
        with torch.no_grad():
            # each global crop is a group of its own (their blur and solarisation differ)
            teacher = self.teacher_head(self.embed(views[:n_global], self.teacher)).chunk(n_global)
        with autocast(student[0].device, "fp32"):  # softmax over 65536 outputs: in fp32
            return self.criterion([t.float() for t in teacher], [s.float() for s in student],
                                  teacher_temp=self.teacher_temp(progress))

    def after_step(self, progress):
        m = cosine_ramp(self.cfg["momentum"], 1.0, progress)
        update_momentum(self.encoder, self.teacher, m)
        update_momentum(self.head, self.teacher_head, m)
