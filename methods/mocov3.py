"""MoCo v3 (Chen, Xie, He, 2021): symmetrised contrastive loss between a predictor on the query encoder and
a momentum key encoder, in-batch keys only; a ViT is initialised as moco-v3's own (fixed 2-D sin-cos positions,
xavier-uniform weights) and its patch projection stays frozen at its random init."""
import math

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils import dist
from timm.models.vision_transformer import VisionTransformer

from bench.engine import Method, cosine_ramp, momentum_copy
from bench.errors import UserError


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


def sincos_2d(rows, cols, dim, temperature=10000.0):
    """moco-v3's fixed position table (vits.py, build_2d_sincos_position_embedding) for a rows x cols patch grid
    in timm's token order (row-major): token (r, c) gets [sin(r w), cos(r w), sin(c w), cos(c w)], each over the
    dim/4 frequencies w_i = temperature ** -(i / (dim/4))."""
    if dim % 4:
        raise UserError(f"methods.mocov3: the 2-D sin-cos position table needs an embed_dim divisible by 4, got {dim}")
    w = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r, c = (x.flatten()[:, None] * w for x in torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"))
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


@torch.no_grad()
def init_like_mocov3(vit):
    """A timm ViT made as moco-v3's VisionTransformerMoCo (vits.py) with stop_grad_conv1, which its ViT recipe
    sets: the sin-cos table, frozen (class-token rows 0); every Linear xavier-uniform with zero bias, the qkv map as
    three square matrices; the class token at std 1e-6; the patch projection xavier-uniform over its 3 x p x p
    inputs, zero bias, frozen (the ViT stability trick)."""
    grid = vit.patch_embed.grid_size
    table = sincos_2d(*grid, vit.embed_dim)
    prefix = vit.pos_embed.shape[1] - len(table)
    vit.pos_embed.copy_(torch.cat([torch.zeros(prefix, vit.embed_dim), table])[None])
    vit.pos_embed.requires_grad_(False)
    for name, m in vit.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out = m.out_features // 3 if name.endswith("qkv") else m.out_features
            bound = math.sqrt(6 / (fan_out + m.in_features))
            m.weight.uniform_(-bound, bound)
            if m.bias is not None:
                m.bias.zero_()
    if vit.cls_token is not None:
        vit.cls_token.normal_(std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6 / (proj.in_channels * math.prod(proj.kernel_size) + proj.out_channels))
    proj.weight.uniform_(-bound, bound)
    if proj.bias is not None:  # (a pre-norm ViT, CLIP's, has none)
        proj.bias.zero_()
    proj.requires_grad_(False)


def _mlp(layers, dim_in, hidden, dim_out):
    """Linear-BN-ReLU blocks, the last one Linear + BatchNorm without affine (official builder)."""
    blocks = [(dim_in if i == 0 else hidden, hidden, torch.nn.BatchNorm1d(hidden), torch.nn.ReLU())
              for i in range(layers - 1)]
    blocks.append((hidden if layers > 1 else dim_in, dim_out, torch.nn.BatchNorm1d(dim_out, affine=False), None))
    return ProjectionHead(blocks)


class MoCoV3(Method):
    summary = ("momentum encoder + predictor, symmetrised in-batch contrastive loss, ViTs as moco-v3's (fixed "
               "sin-cos positions, frozen patch projection)")
    defaults_source = ("MoCo v3 ViT defaults (facebookresearch/moco-v3: vits.py init, no drop path, mlp 4096-256, "
                       "T 0.2, m 0.99 -> 1 cosine)")

    def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
        super().__init__(backbone, cfg)
        if isinstance(backbone, VisionTransformer):  # (ViTs only: PVTv2's stem conv and T2T's stay as built)
            init_like_mocov3(backbone)
        hidden = cfg["hidden_dim"] or feature_dim
        self.projector = _mlp(3, feature_dim, hidden, cfg["out_dim"])
        self.predictor = _mlp(2, cfg["out_dim"], hidden, cfg["out_dim"])
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
