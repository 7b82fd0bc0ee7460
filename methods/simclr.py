"""SimCLR (Chen et al., 2020): two views, a 2-layer projection head, NT-Xent over the batch."""
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from bench.engine import Method


class SimCLR(Method):
    summary = "contrastive: 2 views, MLP head, NT-Xent against the other images of the batch"
    defaults_source = ("SimCLR paper defaults (head: encoder width - 128, temperature 0.5, its augmentations); no ViT "
                       "settings released")

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        self.head = SimCLRProjectionHead(feature_dim, cfg["hidden_dim"] or feature_dim, cfg["out_dim"])
        self.criterion = NTXentLoss(temperature=cfg["temperature"], gather_distributed=True)  # negatives of every rank

    def loss(self, views, index, label, progress):
        z0, z1 = self.head(self.embed(views)).chunk(2)
        return self.criterion(z0, z1)
