"""T2T-ViT-7 (Yuan et al., ICCV 2021), registered with timm: `timm.create_model("t2t_vit_7")` after `import bench.models`.

Written from the architecture facts of yitu-opensource/T2T-ViT (models/t2t_vit.py, token_performer.py):
a tokens-to-token stem of three soft splits (Unfold k7/s4, k3/s2, k3/s2: overall stride 16) with a Performer
attention after each of the first two, a projection to the embedding width, then a cls token, a fixed sinusoidal
position embedding (a frozen parameter, saved with the weights and resampled between resolutions like DeiT's,
see `bench.models.load_into`) and pre-norm transformer blocks. timm's `Block` scales attention by head_dim ** -0.5 (the
reference does so too unless it loads its own pretrained weights).
"""
from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """[1, n_position, dim]: sin on even channels, cos on odd ones, wavelengths 10000 ** (2 (j // 2) / dim)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class TokenPerformer(nn.Module):
    """Single-head attention with FAVOR+ positive random features (m = dim * kernel_ratio) and a value skip."""

    def __init__(self, dim, in_dim, kernel_ratio=0.5, dropout=0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(dropout))
        self.m = int(in_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.randn(self.m, in_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)  # fixed random features, saved with the weights

    def features(self, x):
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), so that phi(q) . phi(k) estimates exp(q . k)."""
        xd = (x * x).sum(-1, keepdim=True) / 2
        return torch.exp(torch.einsum("bti,mi->btm", x.float(), self.w) - xd) / math.sqrt(self.m)

    def attend(self, x):
        k, q, v = self.kqv(x).split(self.emb, dim=-1)
        kp, qp = self.features(k), self.features(q)
        denom = torch.einsum("btm,bm->bt", qp, kp.sum(1))[..., None]
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
        y = torch.einsum("btm,bnm->btn", qp, kptv) / (denom + 1e-8)
        return v + self.drop(self.proj(y.to(v.dtype)))  # the reference keeps v as a skip connection

    def forward(self, x):
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    def __init__(self, in_chans=3, token_dim=64, embed_dim=256, stem=(7, 4, 2)):
        super().__init__()
        k0 = stem[0]
        self.stem = tuple(stem)
        self.split0 = nn.Unfold(kernel_size=k0, stride=stem[1], padding=stem[2])
        self.split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def grid(self, img_size):
        """Token grid side after the three soft splits (14 at 224 with the default stem)."""
        k, s, p = self.stem
        n = (img_size + 2 * p - k) // s + 1
        for _ in range(2):
            n = (n + 2 - 3) // 2 + 1
        return n

    @staticmethod
    def _to_map(x):
        b, n, c = x.shape
        side = math.isqrt(n)
        return x.transpose(1, 2).reshape(b, c, side, side)

    def forward(self, x):
        x = self.attention1(self.split0(x).transpose(1, 2))
        x = self.attention2(self.split1(self._to_map(x)).transpose(1, 2))
        return self.project(self.split2(self._to_map(x)).transpose(1, 2))


class T2TViT(nn.Module):
    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=256, depth=7, num_heads=4,
                 mlp_ratio=2.0, token_dim=64, drop_rate=0.0, drop_path_rate=0.0, global_pool="token",
                 stem=(7, 4, 2)):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.img_size = img_size
        self.tokens_to_token = T2TModule(in_chans, token_dim, embed_dim, stem)  # stem: first split (k, s, p)
        side = self.tokens_to_token.grid(img_size)
        self.grid_size = (side, side)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(self.grid_size[0] * self.grid_size[1] + 1, embed_dim),
                                      requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also when built on meta
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, drop_path=d)
                                      for d in dpr])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        x = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        return self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))

    def forward_head(self, x, pre_logits=False):
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    # no ImageNet weights ship with timm; the official ones are a file (--init-weights t2t_vit_7=FILE)
    "t2t_vit_7": {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.9,
                  "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                  "first_conv": "tokens_to_token.project", "classifier": "head"},
})


@register_model
def t2t_vit_7(pretrained=False, **kwargs) -> T2TViT:
    args = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, token_dim=64)
    return build_model_with_cfg(T2TViT, "t2t_vit_7", pretrained, **dict(args, **kwargs))
