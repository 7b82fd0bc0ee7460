"""Backbones by timm name, and weight transfer between stages (pretrain 112 -> fine-tune 224 -> 448)."""
from __future__ import annotations

import functools
import os
import re
import socket

import timm
import torch
from timm.layers import resample_abs_pos_embed

from bench.errors import UserError
from bench.models import t2t_vit  # noqa: F401  registers t2t_vit_7 with timm, for every user of a backbone name

NAMES = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "deit_base_patch16_224": "DeiT-Base",
    "pvt_v2_b0": "PVTv2-B0",
    "pvt_v2_b3": "PVTv2-B3",
    "t2t_vit_7": "T2T-ViT-7",
}

_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.")


def create(name, resolution, num_classes, drop_path=0.0, kwargs=None):
    """A randomly initialised timm model built for `resolution` px with a `num_classes`-way head.

    Models with absolute position embeddings are built at that size; the others (PVTv2) take any size."""
    if not timm.is_model(name):
        raise UserError(f"unknown backbone '{name}': see timm.list_models()")
    args = dict(pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **(kwargs or {}))
    try:
        return timm.create_model(name, img_size=resolution, **args)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **args)


def _hf_cached(hf_id):
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hf_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


@functools.lru_cache(maxsize=1)
def _online():
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def imagenet_weights_missing(name):
    """Why timm's ImageNet weights for `name` cannot be had here, or None when they can."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    hf_id = getattr(cfg, "hf_hub_id", None)
    if not hf_id:
        return f"timm has no ImageNet weights for {name}: pass --init-weights {name}=FILE"
    if _hf_cached(hf_id) or _online():
        return None
    return f"offline, and timm's ImageNet weights for {name} are not in the local cache: pass --init-weights {name}=FILE"


def imagenet_weights(name):
    """timm's ImageNet weights for `name`, in the form stages hand to each other."""
    model = timm.create_model(name, pretrained=True)
    return {"backbone": name, "resolution": model.pretrained_cfg["input_size"][-1], "state_dict": model.state_dict()}


def read_weights(path, name):
    """A weights file: one of ours, or a plain state dict (optionally under 'model' / 'state_dict'), taken as `name`."""
    import argparse
    import pickle

    try:
        # tensors and plain data only: unpickling anything else runs code the file names. The argparse.Namespace
        # that research scripts save beside their weights (an "args" entry) is plain data too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text runs to many lines: the gist of it
        what = re.search(r"GLOBAL (\S+)", str(e))
        if what:
            raise UserError(f"{path} holds Python objects besides weights ({what[1]}), which bench does not "
                            f"unpickle: save its state dict alone (torch.save(obj['model'], ...))") from None
        why = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise UserError(f"cannot read weights file {path}: not a file torch.save wrote ({why})") from None
    except Exception as e:  # missing, cut short, not a torch file: whatever it is, it cannot be used
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "backbone" in obj and "state_dict" in obj:
        return obj
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds no state dict")
    return {"backbone": name, "resolution": None, "state_dict": obj}


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

    Wrapper prefixes are stripped, a head of another shape is dropped, absolute position embeddings are
    resampled bicubically to the new token grid, the cls row kept: DeiT's learned ones, and T2T-ViT's fixed
    sinusoid table too, as the official main_t2t.py does with the checkpoint's table (7x7 -> 14x14 -> 28x28)
    rather than building a fresh one; PVTv2 has none."""
    state, missing = fitted(model, saved, name)
    model.load_state_dict(state, strict=False)
    return missing


def fitted(model, saved, name):
    """(the state `load_into` loads, the model's keys it leaves alone: the head's); a UserError where the
    weights cannot start `model`. On a meta-device model it checks a file without loading anything."""
    if saved["backbone"] != name:
        raise UserError(f"checkpoint is a {saved['backbone']}, cannot load it into a {name}")
    own = model.state_dict()
    state, other = {}, {}
    for k, v in saved["state_dict"].items():
        k = _strip(k)
        if k not in own or not isinstance(v, torch.Tensor):
            continue
        found = v.shape
        if k == "pos_embed" and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            prefix = getattr(model, "num_prefix_tokens", 1)
            grid = getattr(model, "grid_size", None) or model.patch_embed.grid_size
            try:
                v = resample_abs_pos_embed(v, new_size=list(grid),
                                           num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
            except RuntimeError:  # tokens that are no square grid past the model's prefix (a distilled DeiT's two)
                pass
        if v.shape != own[k].shape:  # the pretraining head (N instances) vs the classifier
            other[k] = found
            continue
        state[k] = v
    missing = [k for k in own if k not in state]
    body = [k for k in missing if not k.startswith("head")]
    shaped = [k for k in body if k in other]
    if shaped:  # another width or depth of the model, or another model under the same keys
        k = shaped[0]
        raise UserError(f"checkpoint of {name} has weights of other shapes than the model's: {k} "
                        f"{list(other[k])} where the model has {list(own[k].shape)}"
                        + (f" ({len(shaped)} such weights)" if len(shaped) > 1 else ""))
    if body:
        raise UserError(f"checkpoint of {name} lacks weights: {', '.join(body[:5])}")
    return state, missing
