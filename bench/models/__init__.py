"""Backbones by timm name, and weight transfer between stages (pretrain 112 -> fine-tune 224 -> 448)."""
from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed

from bench.errors import UserError

NAMES = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "deit_base_patch16_224": "DeiT-Base",
    "pvt_v2_b0": "PVTv2-B0",
    "pvt_v2_b3": "PVTv2-B3",
    "t2t_vit_7": "T2T-ViT-7",
}

_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.")


def create(name, resolution, num_classes, drop_path=0.0, kwargs=None):
    """A randomly initialised timm model built for `resolution` px with a `num_classes`-way head."""
    try:
        return timm.create_model(name, pretrained=False, img_size=resolution, num_classes=num_classes,
                                 drop_path_rate=drop_path, **(kwargs or {}))
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown backbone '{name}': see timm.list_models()") from None
        raise


def export(model, name, resolution):
    """What a stage hands to the next one: weights plus what is needed to check and adapt them."""
    return {"backbone": name, "resolution": resolution, "state_dict": model.state_dict()}


def _strip(key):
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_into(model, saved, name):
    """Load a previous stage's weights into `model` (same backbone, any resolution, any head).

    Wrapper prefixes are stripped, a head of another shape is dropped, and learned absolute position
    embeddings are resampled bicubically to the new token grid."""
    if saved["backbone"] != name:
        raise UserError(f"checkpoint is a {saved['backbone']}, cannot load it into a {name}")
    own = model.state_dict()
    state = {}
    for k, v in saved["state_dict"].items():
        k = _strip(k)
        if k not in own:
            continue
        if k == "pos_embed" and v.shape != own[k].shape:
            prefix = getattr(model, "num_prefix_tokens", 1)
            v = resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size),
                                       num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
        if v.shape != own[k].shape:  # the pretraining head (N instances) vs the classifier
            continue
        state[k] = v
    missing = [k for k in own if k not in state]
    if any(not k.startswith("head") for k in missing):
        raise UserError(f"checkpoint of {name} lacks weights: {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)
    return missing
