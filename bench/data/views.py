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
    if spec.get("randaugment"):
        x = randaugment(x, **spec["randaugment"])
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

def mix_lambda(alpha):
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


# --- RandAugment, batched -----------------------------------------------------------------------------------
# UDA-style (as in the official fine-tuning): for every image two ops drawn from the list below, each applied
# with probability p at a magnitude drawn uniformly from [lo, hi] out of 10. The ops act on the subset of the
# batch that drew them, with per-sample magnitudes, so there is no per-image Python. The official code's exact
# list of 15 ops was not available to us: these are UDA's 14 image ops plus Cutout.

def _blend(a, b, factor):
    return (b + (a - b) * factor[:, None, None, None]).clamp(0, 1)


def _signed(level):
    return level * torch.where(torch.rand_like(level) < 0.5, -1.0, 1.0)


def _affine(x, theta):
    """Warp by per-sample 2x3 matrices (normalised coordinates); uncovered pixels are mid-grey, as UDA fills."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), grid, align_corners=False)
    img, cover = warped[:, :3], warped[:, 3:]
    return img + (1 - cover) * 0.5


def _theta(n, device, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0):
    t = torch.zeros(n, 2, 3, device=device)
    for (i, j), v in zip([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], [a, b, c, d, e, f]):
        t[:, i, j] = v
    return t


def _equalize(x):
    n, c, h, w = x.shape
    idx = (x * 255).round().long().clamp(0, 255).view(n, c, -1)
    hist = torch.zeros(n, c, 256, device=x.device).scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float))
    cdf = hist.cumsum(2)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).min(2, keepdim=True).values
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp(min=1)).clamp(0, 1)
    return lut.gather(2, idx).view(n, c, h, w)


def _cutout(x, level):
    n, _, h, w = x.shape
    side = (level * 0.5 * min(h, w)).round().long().clamp(min=1)[:, None, None]
    cy = torch.randint(h, (n, 1, 1), device=x.device)
    cx = torch.randint(w, (n, 1, 1), device=x.device)
    ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    hole = ((ys - cy).abs() <= side // 2) & ((xs - cx).abs() <= side // 2)
    return torch.where(hole[:, None], torch.full_like(x, 0.5), x)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13


def _sharpen(x, factor):
    k = _SMOOTH.to(x.device, x.dtype).expand(3, 1, 3, 3)
    return _blend(x, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), factor)


RANDAUGMENT_OPS = {  # op(images, level in (0, 1]) -> images
    "identity": lambda x, v: x,
    "autocontrast": lambda x, v: ((x - x.amin((2, 3), keepdim=True))
                                  / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True)).clamp(min=1e-3)),
    "equalize": lambda x, v: _equalize(x),
    "rotate": lambda x, v: _affine(x, _rotation(_signed(v) * math.radians(30))),
    "solarize": lambda x, v: torch.where(x >= (1 - v)[:, None, None, None], 1 - x, x),
    "color": lambda x, v: _blend(x, _grey(x).expand_as(x), 0.1 + 1.8 * v),
    "posterize": lambda x, v: torch.floor(x * 255 / (2 ** (v * 4).floor())[:, None, None, None])
    * (2 ** (v * 4).floor())[:, None, None, None] / 255,
    "contrast": lambda x, v: _blend(x, _grey(x).mean((2, 3), keepdim=True).expand_as(x), 0.1 + 1.8 * v),
    "brightness": lambda x, v: _blend(x, torch.zeros_like(x), 0.1 + 1.8 * v),
    "sharpness": lambda x, v: _sharpen(x, 0.1 + 1.8 * v),
    "shear_x": lambda x, v: _affine(x, _theta(len(x), x.device, b=_signed(v) * 0.3)),
    "shear_y": lambda x, v: _affine(x, _theta(len(x), x.device, d=_signed(v) * 0.3)),
    "translate_x": lambda x, v: _affine(x, _theta(len(x), x.device, c=_signed(v) * 0.6)),  # up to 30% of the side
    "translate_y": lambda x, v: _affine(x, _theta(len(x), x.device, f=_signed(v) * 0.6)),
    "cutout": _cutout,
}


def _rotation(angle):
    c, s = torch.cos(angle), torch.sin(angle)
    t = torch.zeros(len(angle), 2, 3, device=angle.device)
    t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = c, -s, s, c
    return t


def randaugment(x, ops=2, p=0.5, magnitude=(1, 9)):
    names = list(RANDAUGMENT_OPS)
    for _ in range(ops):
        pick = torch.randint(len(names), (len(x),), device=x.device)
        on = torch.rand(len(x), device=x.device) < p
        level = torch.randint(magnitude[0], magnitude[1] + 1, (len(x),), device=x.device).float() / 10
        out = x.clone()
        for k, name in enumerate(names):
            sel = on & (pick == k)
            if sel.any():
                out[sel] = RANDAUGMENT_OPS[name](x[sel], level[sel]).clamp(0, 1).to(x.dtype)
        x = out
    return x
