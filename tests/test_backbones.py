"""The paper's backbones at the paper's resolutions, T2T-ViT-7's size, and weight transfer between stages."""
import math

import pytest
import timm
import torch

from bench import models  # registers t2t_vit_7
from bench.errors import UserError

BACKBONES = ["deit_tiny_patch16_224", "deit_base_patch16_224", "pvt_v2_b0", "pvt_v2_b3", "t2t_vit_7"]


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_shapes_at_112_224_448(name):
    torch.manual_seed(0)
    for res in (112, 224, 448):
        model = models.create(name, res, 10).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, res, res)).shape == (2, 10)


def test_t2t_vit_7_is_a_timm_model_of_4_3m_parameters():
    model = timm.create_model("t2t_vit_7", num_classes=1000)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(trainable - 4.3e6) < 0.1e6
    assert not model.pos_embed.requires_grad  # fixed sinusoidal table
    pe = model.pos_embed[0]
    assert torch.allclose(pe[3, 0], torch.tensor(math.sin(3.0))) and torch.allclose(pe[3, 1], torch.tensor(math.cos(3.0)))


def test_deit_position_embedding_resampling_keeps_a_smooth_field():
    small = models.create("deit_tiny_patch16_224", 112, 0)  # 7x7 grid
    big = models.create("deit_tiny_patch16_224", 224, 0)    # 14x14 grid

    def field(n):  # an analytic, smooth embedding over the grid, sampled at cell centres in [0, 1]
        c = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(c, c, indexing="ij")
        f = torch.stack([torch.sin(2 * x + k * y) for k in torch.linspace(0, 1, 192)], -1)
        return f.reshape(1, n * n, 192)

    with torch.no_grad():
        small.pos_embed.copy_(torch.cat([torch.full((1, 1, 192), 7.0), field(7)], 1))
    models.load_into(big, models.export(small, "deit_tiny_patch16_224", 112), "deit_tiny_patch16_224")
    got = big.pos_embed
    assert torch.equal(got[:, 0], torch.full((1, 192), 7.0))  # the cls token's embedding is not resampled
    err = (got[:, 1:] - field(14)).abs()
    # bicubic on cell centres gives 0.030 / 0.012 here; corner-aligned sampling 0.053 / 0.021, nearest 0.089 / 0.036
    assert err.reshape(14, 14, 192)[2:-2, 2:-2].max() < 0.035
    assert err.mean() < 0.015


def test_112_224_448_chain_keeps_the_trained_weights():
    name, kw = "deit_tiny_patch16_224", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    pre = models.create(name, 16, 0, kwargs=kw)
    ft = models.create(name, 32, 5, kwargs=kw)
    models.load_into(ft, models.export(pre, name, 16), name)
    assert torch.equal(ft.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)
    assert ft.pos_embed.shape[1] == 1 + 8 * 8
    hi = models.create(name, 64, 5, kwargs=kw)
    missing = models.load_into(hi, models.export(ft, name, 32), name)
    assert missing == [] and torch.equal(hi.head.weight, ft.head.weight)  # same classes: the head carries over
    assert hi.pos_embed.shape[1] == 1 + 16 * 16


def test_t2t_chain_resamples_the_pretrained_sinusoid_table_like_main_t2t():
    """main_t2t.py of the official release: the checkpoint's table minus its cls row, as a 2-D grid, bicubic
    (align_corners False, no antialias) to the new grid; the cls row kept. Not a fresh 1-D table of 197 rows."""
    a, b = models.create("t2t_vit_7", 112, 0), models.create("t2t_vit_7", 224, 10)
    fresh = b.pos_embed.clone()
    models.load_into(b, models.export(a, "t2t_vit_7", 112), "t2t_vit_7")
    table = a.pos_embed.detach()
    grid = table[:, 1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 196, -1)], 1)
    assert torch.allclose(b.pos_embed, expected, atol=1e-6)
    assert not torch.allclose(b.pos_embed, fresh, atol=0.1)
    assert not b.pos_embed.requires_grad
    assert torch.equal(b.blocks[0].mlp.fc1.weight, a.blocks[0].mlp.fc1.weight)


def test_a_checkpoint_of_another_backbone_is_refused():
    saved = models.export(models.create("pvt_v2_b0", 112, 0), "pvt_v2_b0", 112)
    with pytest.raises(UserError, match="checkpoint is a pvt_v2_b0, cannot load it into a deit_tiny"):
        models.load_into(models.create("deit_tiny_patch16_224", 112, 0), saved, "deit_tiny_patch16_224")
