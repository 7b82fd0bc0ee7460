"""SupCon (Khosla et al., 2020): contrastive learning where every image of the same class is a positive."""
import torch
import torch.nn.functional as F
from lightly.models.modules import SimCLRProjectionHead
from lightly.utils import dist

from bench.engine import Method


def supcon_loss(features, labels, temperature):
    """L_out of Khosla et al. (2020), Eq. 2: for each anchor i with at least one positive,
    -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) ), averaged over those anchors.

    features: [N, D], all views stacked (L2-normalised here); labels: [N]. No T/base_T factor."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # the anchor is never its own contrast
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0).sum(1) / n_pos.clamp(min=1)
    has_pos = (n_pos > 0).float()  # a mask, not a selection: selecting would read the count back from the GPU
    return -(mean_log_prob_pos * has_pos).sum() / has_pos.sum()


class SupCon(Method):
    summary = "supervised contrastive (L_out): 2 views, MLP head, same-label images are positives"
    defaults_source = "authors' SupCon settings (projection 256, temperature 0.5, batch 512, lr 5e-4, wd 1e-3)"

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        self.head = SimCLRProjectionHead(feature_dim, feature_dim, cfg["out_dim"], batch_norm=False)

    def loss(self, views, index, label, progress):
        z = self.head(self.embed(views))
        labels = label.repeat(len(z) // len(label))
        if dist.world_size() > 1:  # every rank computes the loss of the whole batch (gradients flow back through
            z = torch.cat(dist.gather(z))  # the gather; the engine's averaging makes them the one-process ones)
            labels = torch.cat(dist.gather(labels))
        return supcon_loss(z, labels, self.cfg["temperature"])
