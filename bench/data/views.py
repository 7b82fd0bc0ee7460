"""Batched augmentation: every crop of a whole batch made at once, with per-sample random parameters.

Images arrive as one uint8 tensor [B, 3, H, W] on the training device. Crops are cut and resized by
`roi_align` (one call per crop group), then flip, colour jitter, greyscale, blur and solarise are applied as
tensor arithmetic with per-sample factors. There is no PIL and no per-image Python, so the same code runs on
CPU tensors (tests, demo) and on a GPU (the paper's recipe). Randomness comes from torch's global generator,
which the engine seeds per epoch.

Differences from torchvision's PIL pipeline, kept on purpose: crops are resampled bilinearly with area
averaging (roi_align, adaptive sampling) rather than bicubically; the four jitter operations run in a fixed
order (brightness, contrast, saturation, hue) rather than a random one; hue is rotated in YIQ space rather
than shifted in HSV.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def _uniform(lo, hi, n, device):
    return torch.rand(n, device=device) * (hi - lo) + lo


def random_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """RandomResizedCrop boxes [n, 4] (x1, y1, x2, y2): area fraction ~ U(scale), log aspect ~ U(log ratio)."""
    area = _uniform(*scale, n, device) * height * width
    log_r = _uniform(math.log(ratio[0]), math.log(ratio[1]), n, device)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(1, width)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(1, height)
    x1 = torch.rand(n, device=device) * (width - w)
    y1 = torch.rand(n, device=device) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def _grey(x):
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_rotate(x, shift):
    """Rotate hue by `shift` turns per sample (YIQ rotation: a linear 3x3 map per sample)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device, dtype=x.dtype)
    theta = shift * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(x), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x)


def _blur(x, sigma):
    """Gaussian blur with a per-sample sigma (pixels), separable, as one grouped convolution."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x, spec):
    """Photometric augmentation of float images in [0, 1], per-sample parameters; returns [0, 1] images."""
    b, dev = len(x), x.device
    flip = torch.rand(b, device=dev) < spec.get("flip", 0.0)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    jitter = spec.get("jitter")
    if jitter and spec.get("jitter_p", 0) > 0:
        bri, con, sat, hue = jitter
        on = (torch.rand(b, device=dev) < spec["jitter_p"]).to(x.dtype)

        def factor(strength):  # 1 where jitter is off
            return (1 + on * _uniform(-strength, strength, b, dev))[:, None, None, None]

        x = (x * factor(bri)).clamp(0, 1)
        mean = _grey(x).mean((2, 3), keepdim=True)
        x = ((x - mean) * factor(con) + mean).clamp(0, 1)
        g = _grey(x)
        x = ((x - g) * factor(sat) + g).clamp(0, 1)
        x = _hue_rotate(x, on * _uniform(-hue, hue, b, dev)).clamp(0, 1)
    if spec.get("grayscale_p", 0) > 0:
        to_grey = torch.rand(b, device=dev) < spec["grayscale_p"]
        x = torch.where(to_grey[:, None, None, None], _grey(x).expand_as(x), x)
    if spec.get("blur_p", 0) > 0:
        blur = torch.rand(b, device=dev) < spec["blur_p"]
        if blur.any():
            sigma = _uniform(*spec["blur_sigma"], b, dev)
            x = torch.where(blur[:, None, None, None], _blur(x, sigma), x)
    if spec.get("solarize_p", 0) > 0:
        sol = torch.rand(b, device=dev) < spec["solarize_p"]
        x = torch.where(sol[:, None, None, None] & (x >= 0.5), 1 - x, x)
    return x


def normalize(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def make_views(images, spec):
    """uint8 [B, 3, H, W] -> one normalised float tensor per crop group, [count * B, 3, size, size] each,
    ordered crop-major (all images' first crop, then all images' second crop, ...)."""
    x = images.float().div_(255)
    b, _, h, w = x.shape
    groups = []
    for g in spec["crops"]:
        n = g["count"] * b
        boxes = random_boxes(n, h, w, g["scale"], device=x.device)
        idx = torch.arange(b, device=x.device, dtype=x.dtype).repeat(g["count"])
        crops = roi_align(x, torch.cat([idx[:, None], boxes], 1), output_size=g["size"],
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        groups.append(normalize(augment(crops, {**spec, **g})))  # a group may override the method's strengths
    return groups


def eval_view(images, resolution, resize_ratio):
    """Resize the shorter side to resolution * ratio (bicubic) and centre-crop `resolution`, normalised."""
    x = images.float().div_(255)
    side = round(resolution * resize_ratio)
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top = (side - resolution) // 2
    return normalize(x[:, :, top:top + resolution, top:top + resolution])


# --- mixing -------------------------------------------------------------------------------------------------

def mix_lambda(alpha, device="cpu"):
    """lambda ~ Beta(alpha, alpha), folded to max(lambda, 1 - lambda) as in the official code."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return max(lam, 1 - lam)


def cutmix_box(lam, height, width):
    """A box of side sqrt(1 - lam) * (H, W) with a uniform centre, clipped to the image; returns
    (y1, y2, x1, x2, lam) where lam is recomputed from the clipped box's area."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y1, y2, x1, x2, 1 - (y2 - y1) * (x2 - x1) / (height * width)


def cutmix(x, alpha):
    """Paste a box from a shuffled copy of the batch. Returns (mixed x, permutation, lam)."""
    perm = torch.randperm(len(x), device=x.device)
    y1, y2, x1, x2, lam = cutmix_box(mix_lambda(alpha), x.shape[2], x.shape[3])
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return x, perm, lam


def mixup(x, alpha):
    perm = torch.randperm(len(x), device=x.device)
    lam = mix_lambda(alpha)
    return lam * x + (1 - lam) * x[perm], perm, lam


def mixed_cross_entropy(logits, target, perm, lam, label_smoothing=0.0):
    """lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm]), each with label smoothing."""
    ce = lambda y: F.cross_entropy(logits, y, label_smoothing=label_smoothing)  # noqa: E731
    return lam * ce(target) + (1 - lam) * ce(target[perm])
