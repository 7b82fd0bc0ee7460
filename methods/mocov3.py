"""MoCo v3 (Chen, Xie, He, 2021): symmetrised contrastive loss between a predictor on the query encoder and
a momentum key encoder, in-batch keys only; for ViTs the patch projection stays frozen at its random init."""
import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils import dist
from timm.models.vision_transformer import VisionTransformer

from bench.engine import Method, cosine_ramp, momentum_copy


def mocov3_loss(q, k, temperature):
    """Cross-entropy of normalised q against normalised k (logits q k^T / T, targets the diagonal), times 2T.
    Under torch.distributed the keys of every rank are the negatives (official concat_all_gather)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    target = torch.arange(len(q), device=q.device)
    if dist.world_size() > 1:
        k = torch.cat(dist.gather(k.detach()))
        target = target + dist.rank() * len(q)
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, target) * 2 * temperature


def _mlp(layers, dim_in, hidden, dim_out):
    """Linear-BN-ReLU blocks, the last one Linear + BatchNorm without affine (official builder)."""
    blocks = [(dim_in if i == 0 else hidden, hidden, torch.nn.BatchNorm1d(hidden), torch.nn.ReLU())
              for i in range(layers - 1)]
    blocks.append((hidden if layers > 1 else dim_in, dim_out, torch.nn.BatchNorm1d(dim_out, affine=False), None))
    return ProjectionHead(blocks)


class MoCoV3(Method):
    summary = "momentum encoder + predictor, symmetrised in-batch contrastive loss, frozen patch projection"
    defaults_source = "MoCo v3 ViT defaults (facebookresearch/moco-v3: mlp 4096-256, T 0.2, m 0.99 -> 1 cosine)"

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        if isinstance(backbone, VisionTransformer):  # the ViT stability trick: a random, frozen patch projection
            backbone.patch_embed.proj.requires_grad_(False)  # (ViTs only: PVTv2's stem conv keeps learning)
        self.projector = _mlp(3, feature_dim, cfg["hidden_dim"], cfg["out_dim"])
        self.predictor = _mlp(2, cfg["out_dim"], cfg["hidden_dim"], cfg["out_dim"])
        self.key_encoder = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)

    def loss(self, views, index, label, progress):
        x1, x2 = torch.cat(views).chunk(2)
        # each view on its own through the BatchNorms, as in the official code
        q1, q2 = (self.predictor(self.projector(self.encoder(x))) for x in (x1, x2))
        with torch.no_grad():
            k1, k2 = (self.key_projector(self.key_encoder(x)) for x in (x1, x2))
        t = self.cfg["temperature"]
        return mocov3_loss(q1, k2, t) + mocov3_loss(q2, k1, t)

    def after_step(self, progress):
        m = cosine_ramp(self.cfg["momentum"], 1.0, progress)
        update_momentum(self.encoder, self.key_encoder, m)
        update_momentum(self.projector, self.key_projector, m)
