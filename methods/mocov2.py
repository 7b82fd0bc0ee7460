"""MoCo v2 (Chen et al., 2020): a momentum key encoder and a queue of past keys as negatives."""
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import update_momentum

from bench.engine import Method, momentum_copy


class MoCoV2(Method):
    summary = "contrastive with a momentum key encoder and a queue of negatives (lightly memory bank)"
    defaults_source = ("MoCo v2 paper defaults (head: encoder width - 128, T 0.2, queue 65536, m 0.999); no ViT "
                       "settings released")

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        self.head = MoCoProjectionHead(feature_dim, cfg["hidden_dim"] or feature_dim, cfg["out_dim"])
        self.key_encoder = momentum_copy(backbone)
        self.key_head = momentum_copy(self.head)
        # the queue takes every rank's keys, as the official concat_all_gather does
        self.criterion = NTXentLoss(temperature=cfg["temperature"], memory_bank_size=(cfg["queue"], cfg["out_dim"]),
                                    gather_distributed=True)
        # lightly keeps the queue and its write position out of the state dict: a resumed job would start from a
        # fresh random queue. As persistent buffers they travel in every checkpoint.
        bank = self.criterion.memory_bank
        for name in ("bank", "bank_ptr"):
            bank.register_buffer(name, getattr(bank, name), persistent=True)

    def loss(self, views, index, label, progress):
        x_q, x_k = torch.cat(views).chunk(2)
        q = self.head(self.encoder(x_q))
        with torch.no_grad():
            k = self.key_head(self.key_encoder(x_k))
        return self.criterion(q, k)

    def after_step(self, progress):
        update_momentum(self.encoder, self.key_encoder, self.cfg["momentum"])
        update_momentum(self.head, self.key_head, self.cfg["momentum"])
