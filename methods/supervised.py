"""Supervised pretraining on the labels of the pretraining set (the transfer table's "supervised" row)."""
import torch

from bench.finetune import Classifier


class Supervised(Classifier):
    summary = "supervised: cross-entropy with the pretraining set's labels, the fine-tuning recipe's mixing"
    defaults_source = "the fine-tuning recipe (official main_deit.py) applied to the pretraining set"

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def logits(self, x):
        return self.head(self.encoder(x))
