"""IDMM: parametric instance discrimination with multi-crop, CutMix and label smoothing (Cao et al., ECCV 2022).

Each training image is its own class: an N-way linear classifier (with bias, no projection head, no feature
normalisation, no temperature) sits on the backbone's pooled feature. The two large crops form group A and
the four small crops group B; each group gets its own CutMix and the loss is CE(A) + CE(B).
"""
import torch

from bench.data.views import cutmix, mix_in_parts, mixed_cross_entropy
from bench.engine import Method, world_size


class IDMM(Method):
    summary = "instance discrimination, N-way classifier, 2+4 crops, CutMix per crop group, label smoothing"
    defaults_source = "official IDMM scripts (run_deit_tiny_instance_discrimination_flowers.sh)"

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        # the backbone's own Linear(embed_dim, N) in the official code; kept apart so fine-tuning drops it
        self.classifier = torch.nn.Linear(feature_dim, num_instances)
        torch.nn.init.trunc_normal_(self.classifier.weight, std=0.02)  # as timm/DeiT initialise their head
        torch.nn.init.zeros_(self.classifier.bias)

    def loss(self, views, index, label, progress):
        # each group its own CutMix (per part of the batch: one per GPU of the authors' 4, as they ran it),
        # then all crops of one size through the backbone as one batch
        parts = max(1, self.cfg["mix_parts"] // world_size())
        mixed = [mix_in_parts(group, len(group) // len(index), parts, lambda x: cutmix(x, self.cfg["cutmix_beta"]))
                 for group in views]
        logits = self.classifier(self.embed([x for x, _, _ in mixed]))
        total, start = 0.0, 0
        for x, perm, lam in mixed:  # group A (2 large crops), group B (4 small crops)
            target = index.repeat(len(x) // len(index))
            out = logits[start:start + len(x)]
            start += len(x)
            total = total + mixed_cross_entropy(out, target, perm, lam, self.cfg["label_smoothing"])
        return total
