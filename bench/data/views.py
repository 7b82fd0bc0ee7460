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

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def _uniform(lo, hi, n, device):
    return torch.rand(n, device=device) * (hi - lo) + lo


# On a GPU, a plain copy from host memory (`.to(dev)`, `torch.tensor(..., device=dev)`) waits until every kernel
# queued before it has run, so the host can no longer run ahead of the GPU: each one inside a step serialises the
# step's host work with the device's. Host draws go through `to_device` (pinned, non-blocking); constants are
# made once per device (`_const`); nothing here reads a device tensor back.
def to_device(t, dev):
    """A host tensor on `dev` without waiting for the device's queue (pinned memory, non-blocking copy)."""
    dev = torch.device(dev)
    if t.device.type != "cpu" or dev.type == "cpu":  # no copy from host memory to a device
        return t.to(dev)
    return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _const(values, device, dtype):
    """A constant tensor (nested tuples) on `device`: copied there once, then reused."""
    return torch.tensor(values, dtype=dtype).to(device)


def _column(v, n, device):
    """A number or a tensor of n as a float column [n, 1] on `device`, a number without any copy."""
    if isinstance(v, torch.Tensor):
        return v.to(device, torch.float).expand(n)[:, None]
    return torch.full((n, 1), float(v), device=device)


def random_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu", tries=10):
    """RandomResizedCrop boxes [n, 4] (x1, y1, x2, y2) in pixels, sampled as torchvision's get_params does:
    up to ten tries of an area fraction ~ U(scale) and a log aspect ~ U(log ratio), with the sides rounded to
    whole pixels and the box kept only if it fits; else the centre crop of the image clamped to the ratio range.
    height, width: the image's size, a number or one per box (each image its own)."""
    h_img, w_img = _column(height, n, device), _column(width, n, device)
    area = h_img * w_img * (torch.rand(n, tries, device=device) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(n, tries, device=device) * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0])
    w = torch.round(torch.sqrt(area * torch.exp(log_r)))
    h = torch.round(torch.sqrt(area / torch.exp(log_r)))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    top = torch.floor(torch.rand(n, tries, device=device) * (h_img - h + 1))
    left = torch.floor(torch.rand(n, tries, device=device) * (w_img - w + 1))
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    w, h, top, left = pick(w), pick(h), pick(top), pick(left)
    # fallback: the whole image, or its centre at the nearest allowed aspect ratio
    hi, wi = h_img[:, 0], w_img[:, 0]
    fw = torch.where(wi / hi > ratio[1], torch.round(hi * ratio[1]), wi)
    fh = torch.where(wi / hi < ratio[0], torch.round(wi / ratio[0]), hi)
    none = ~fits.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = torch.where(none, torch.div(hi - h, 2, rounding_mode="floor"), top)
    left = torch.where(none, torch.div(wi - w, 2, rounding_mode="floor"), left)
    return torch.stack([left, top, left + w, top + h], 1)


def _grey(x):
    w = _const(_LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


@functools.lru_cache(maxsize=16)
def _yiq(device, dtype):
    """RGB -> YIQ and its inverse, on `device` (inverted on the host: a GPU's inverse checks for a singular
    matrix by reading the device)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=dtype)
    return to_yiq.to(device), torch.linalg.inv(to_yiq).to(device)


def _hue_rotate(x, shift):
    """Rotate hue by `shift` turns per sample (YIQ rotation: a linear 3x3 map per sample)."""
    to_yiq, from_yiq = _yiq(x.device, x.dtype)
    theta = shift * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(x), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x)


def _blur(x, sigma):
    """Gaussian blur with a per-sample sigma (pixels, a host tensor), separable, as one grouped convolution; the
    kernel reaches 3 sigma of the largest."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    sigma = to_device(sigma, x.device).to(x.dtype)
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
    # after RandAugment, as the official fine-tuning flips (its rotation turns one way only); the other ops are
    # mirror-symmetric, so for the pretraining pipelines (flip first) the order makes no difference
    flip = torch.rand(b, device=dev) < spec.get("flip", 0.0)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if spec.get("blur_p", 0) > 0:  # drawn on the host: the kernel's size and whether to blur at all are known
        blur = torch.rand(b) < spec["blur_p"]  # without waiting for the device
        if blur.any():
            sigma = _uniform(*spec["blur_sigma"], b, "cpu")
            x = torch.where(to_device(blur, dev)[:, None, None, None], _blur(x, sigma), x)
    if spec.get("solarize_p", 0) > 0:
        sol = torch.rand(b, device=dev) < spec["solarize_p"]
        x = torch.where(sol[:, None, None, None] & (x >= 0.5), 1 - x, x)
    return x


def normalize(x):
    mean = _const(IMAGENET_MEAN, x.device, x.dtype).view(1, 3, 1, 1)
    std = _const(IMAGENET_STD, x.device, x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def make_views(images, spec, sizes=None):
    """uint8 [B, 3, H, W] -> one normalised float tensor per crop group, [count * B, 3, size, size] each,
    ordered crop-major (all images' first crop, then all images' second crop, ...). sizes: [B, 2] (height,
    width) of each image's region, top-left in the canvas; None: the whole canvas."""
    x = images.float().div_(255)
    b, _, h, w = x.shape
    groups = []
    for g in spec["crops"]:
        n = g["count"] * b
        if sizes is None:
            boxes = random_boxes(n, h, w, g["scale"], device=x.device)
        else:
            hw = sizes.to(x.device).repeat(g["count"], 1)
            boxes = random_boxes(n, hw[:, 0], hw[:, 1], g["scale"], device=x.device)
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


def mix_in_parts(x, count, parts, mix):
    """Mix the batch in `parts` near-equal parts of its images, each with its own lambda and permutation, as
    each of the authors' 4 GPUs mixed its own quarter of the batch. x holds `count` crops per image, crop-major;
    mix(x) -> (mixed, perm, lam). Returns the mixed crops, a permutation of all rows and each row's lambda."""
    b = len(x) // count
    if parts <= 1 or b < 2:
        mixed, perm, lam = mix(x)
        return mixed, perm, torch.full((len(x),), lam, device=x.device)
    out, perm, lam = torch.empty_like(x), torch.empty(len(x), dtype=torch.long, device=x.device), \
        torch.empty(len(x), device=x.device)
    for images in torch.tensor_split(torch.arange(b, device=x.device), min(parts, b)):
        rows = (torch.arange(count, device=x.device)[:, None] * b + images[None]).reshape(-1)
        mixed, p, part_lam = mix(x[rows])
        out[rows], perm[rows], lam[rows] = mixed, rows[p], part_lam
    return out, perm, lam


def mixed_cross_entropy(logits, target, perm, lam, label_smoothing=0.0):
    """lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm]), each with label smoothing; lam may be one per row
    (mix_in_parts), then each row's own."""
    ce = lambda y: F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")  # noqa: E731
    return (lam * ce(target) + (1 - lam) * ce(target[perm])).mean()


# --- RandAugment, batched ------------------------------------------------------------------------------------
# The official fine-tuning's RandAugment (utils/data_utils.py of the release: `RandAugment.get_trans_list`,
# `SubPolicy`, `Cutout`), itself adapted from UDA: for every image a pair of (op, magnitude m in 1..9), each op
# applied with probability 0.5. Each op below reproduces the PIL call the reference makes at that magnitude, on
# the subset of the batch that drew it, with per-sample magnitudes and signs, so there is no per-image Python.
# PIL works on uint8: every op's output is a level of 255 as PIL's would be. The affine ops fill uncovered pixels with grey 128 as the reference does.

_FILL = 128 / 255
_CUTOUT_FILL = (125 / 255, 122 / 255, 113 / 255)


def _q(x):
    return (x.clamp(0, 1) * 255).round() / 255


def _blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped, truncated to a level as PIL does."""
    out = (degenerate + (x - degenerate) * factor[:, None, None, None]).clamp(0, 1)
    return (out * 255 + 1e-3).floor() / 255


def _enhance_factor(m, rand):
    """1 +/- 0.1 m, sign drawn per image (the reference's `1 + magnitude * random.choice([-1, 1])`)."""
    return 1 + 0.1 * m * _sign(rand)


def _sign(rand):
    return torch.where(rand[:, 0] < 0.5, -1.0, 1.0).to(rand.device)


def _luma(x):
    """PIL's convert("L"): ITU-R 601-2 luma, rounded to an integer level."""
    return _q(_grey(x))


@functools.lru_cache(maxsize=16)
def _pixel_centres(h, w, device, dtype):
    rows, cols = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")
    return torch.stack([cols, rows, torch.ones_like(rows)], -1)


def _warp(x, matrix, bicubic):
    """PIL's Image.transform(AFFINE, matrix): output pixel (col, row) takes the input at
    matrix @ (col + 0.5, row + 0.5, 1), in pixels; where that point is outside the image, grey 128.
    Nearest (PIL's default) takes the pixel containing the point; bicubic interpolates (torch's a = -0.75
    where PIL's is -0.5: within a few levels)."""
    n, c, h, w = x.shape
    src = torch.einsum("nij,hwj->nhwi", matrix.to(x.dtype), _pixel_centres(h, w, x.device, x.dtype))  # [n, h, w, 2]
    sx, sy = src[..., 0], src[..., 1]
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h))[:, None]
    if bicubic:
        grid = torch.stack([sx * 2 / w - 1, sy * 2 / h - 1], -1)
        out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    else:
        xi, yi = sx.floor().long().clamp(0, w - 1), sy.floor().long().clamp(0, h - 1)
        out = x[torch.arange(n, device=x.device)[:, None, None], :, yi, xi].permute(0, 3, 1, 2)
    return torch.where(inside, out, torch.full_like(out, _FILL))


def _matrix(n, device, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0):
    """Per-sample PIL affine coefficients (a, b, c, d, e, f) as [n, 2, 3]; each may be a tensor of n."""
    return torch.cat([_column(v, n, device) for v in (a, b, c, d, e, f)], 1).view(n, 2, 3)


def _rotation(h, w, m, rand):
    """PIL's rotate(30 m / 9) about the centre, counter-clockwise (the reference's `rotate_with_fill`: always this
    direction; the line drawing a random sign is commented out there)."""
    a = -torch.deg2rad(30 * m / 9)
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2, h / 2
    return _matrix(len(m), m.device, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _shift(m, rand, side):
    """A shift of up to 150/331 (45%) of the side, as the reference's translatex/translatey."""
    return 150 / 331 * m / 9 * side * _sign(rand)


# the geometric ops as PIL affine maps (h, w, m, rand) -> [n, 2, 3], and whether PIL resamples them bicubically
# (shear) or takes the nearest pixel (the others); RandAugment warps all the images of one kind in one call
_AFFINE = {
    "shear_x": (lambda h, w, m, r: _matrix(len(m), m.device, b=0.3 * m / 9 * _sign(r)), True),
    "translate_x": (lambda h, w, m, r: _matrix(len(m), m.device, c=_shift(m, r, w)), False),
    "translate_y": (lambda h, w, m, r: _matrix(len(m), m.device, f=_shift(m, r, h)), False),
    "shear_y": (lambda h, w, m, r: _matrix(len(m), m.device, d=0.3 * m / 9 * _sign(r)), True),
    "rotate": (_rotation, False),
}


def _affine_op(name):
    matrix, bicubic = _AFFINE[name]
    return lambda x, m, r: _warp(x, matrix(x.shape[2], x.shape[3], m, r), bicubic)


def _levels(x):
    return (x * 255).round().long().clamp(0, 255)


def _equalize(x):
    """PIL's ImageOps.equalize, per channel: step = (pixels - count of the last used level) // 255, and level i
    maps to (step // 2 + pixels below i) // step; a channel with one level or step 0 is left as it is."""
    n, c, h, w = x.shape
    v = _levels(x).view(n, c, -1)
    hist = torch.zeros(n, c, 256, device=x.device, dtype=torch.long).scatter_add_(2, v, torch.ones_like(v))
    last = 255 - (hist.flip(2) > 0).long().argmax(2, keepdim=True)  # the highest level used
    step = (h * w - hist.gather(2, last)) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    keep = (step == 0) | ((hist > 0).sum(2, keepdim=True) <= 1)
    lut = torch.where(keep, torch.arange(256, device=x.device).expand_as(lut), lut)
    return (lut.gather(2, v).view(n, c, h, w).to(x.dtype)) / 255


def _autocontrast(x):
    """PIL's ImageOps.autocontrast (no cutoff), per channel: the used levels [lo, hi] stretched to [0, 255], truncated."""
    v = _levels(x).to(x.dtype)
    lo, hi = v.amin((2, 3), keepdim=True), v.amax((2, 3), keepdim=True)
    out = ((v - lo) * 255 / (hi - lo).clamp(min=1)).floor().clamp(0, 255) / 255
    return torch.where(hi > lo, out, x)


def _posterize(x, m, rand):
    """ImageOps.posterize with round(8 - 4 m / 9) bits kept (the reference's `round(linspace(8, 4, 10))`)."""
    drop = 2 ** (8 - torch.round(8 - 4 * m / 9))[:, None, None, None]
    return torch.floor(_levels(x) / drop) * drop / 255


def _solarize(x, m, rand):
    """ImageOps.solarize at threshold 256 - 256 m / 9: levels at or above it inverted."""
    thr = (256 - 256 * m / 9)[:, None, None, None]
    return torch.where(_levels(x) >= thr, 1 - x, x)


_SMOOTH = tuple(tuple(v / 13 for v in row) for row in ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0)))


def _sharpness(x, m, rand):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter, which leaves the outermost pixels unfiltered."""
    k = _const(_SMOOTH, x.device, x.dtype).expand(3, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = _q(F.conv2d(x, k, groups=3))
    return _blend(smooth, x, _enhance_factor(m, rand))


def _cutout(x, m, rand):
    """The reference's Cutout: a square of side round(20 m / 9) px (so at most 20 px whatever the image size)
    centred on a uniform pixel, clipped to the image, filled with (125, 122, 113)."""
    n, _, h, w = x.shape
    half = (torch.round(20 * m / 9).long() // 2)[:, None, None]
    cy = (rand[:, 1] * h).long().clamp(max=h - 1)[:, None, None]
    cx = (rand[:, 2] * w).long().clamp(max=w - 1)[:, None, None]
    ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    fill = _const(_CUTOUT_FILL, x.device, x.dtype).view(1, 3, 1, 1)
    return torch.where(hole[:, None], fill, x)


RANDAUGMENT_OPS = {  # the reference's get_trans_list, in its order: op(images, m in 1..9, rand [n, 3]) -> images
    "invert": lambda x, m, r: 1 - x,
    "cutout": _cutout,
    "sharpness": _sharpness,
    "autocontrast": lambda x, m, r: _autocontrast(x),
    "posterize": _posterize,
    "shear_x": _affine_op("shear_x"),
    "translate_x": _affine_op("translate_x"),
    "translate_y": _affine_op("translate_y"),
    "shear_y": _affine_op("shear_y"),
    "rotate": _affine_op("rotate"),
    "equalize": lambda x, m, r: _equalize(x),
    "contrast": lambda x, m, r: _blend(_luma(x).mean((2, 3), keepdim=True).mul(255).round().div(255).expand_as(x),
                                       x, _enhance_factor(m, r)),
    "color": lambda x, m, r: _blend(_luma(x).expand_as(x), x, _enhance_factor(m, r)),
    "solarize": _solarize,
    "brightness": lambda x, m, r: _blend(torch.zeros_like(x), x, _enhance_factor(m, r)),
}


def randaugment(x, ops=2, p=0.5, magnitude=(1, 9)):
    """`ops` slots per image, each an op drawn uniformly from the list with a magnitude uniform in
    [magnitude[0], magnitude[1]], applied with probability p (the reference draws one of all pairs of
    (op, magnitude) uniformly, which is the same)."""
    names, n, dev = list(RANDAUGMENT_OPS), len(x), x.device
    x = _q(x)
    for _ in range(ops):  # the draws on the host: which images take which op is known without a device sync
        pick = torch.randint(len(names), (n,))
        on = torch.rand(n) < p
        m = torch.randint(magnitude[0], magnitude[1] + 1, (n,)).float()
        rand = torch.rand(n, 3)  # a sign, a cutout centre
        out, warps = x.clone(), {False: [], True: []}
        chosen = pick.masked_fill(~on, -1)
        order = torch.argsort(chosen, stable=True)  # the images that take an op, grouped by op
        order = order[chosen[order] >= 0]
        kinds, counts = torch.unique_consecutive(chosen[order], return_counts=True)
        # one copy to the device per slot: each image's row, magnitude and random numbers, op after op
        packed = to_device(torch.cat([order[:, None].float(), m[order, None], rand[order]], 1), dev)
        for k, part in zip(kinds.tolist(), packed.split(counts.tolist())):
            rows, mk, rk = part[:, 0].long(), part[:, 1], part[:, 2:]
            if names[k] in _AFFINE:  # collected: one warp per kind for all of them (each image takes one op)
                matrix, bicubic = _AFFINE[names[k]]
                warps[bicubic].append((rows, matrix(x.shape[2], x.shape[3], mk, rk)))
            else:
                out[rows] = _q(RANDAUGMENT_OPS[names[k]](x[rows], mk, rk)).to(x.dtype)
        for bicubic, parts in warps.items():
            if parts:
                rows = torch.cat([r for r, _ in parts])
                out[rows] = _q(_warp(x[rows], torch.cat([a for _, a in parts]), bicubic)).to(x.dtype)
        x = out
    return x
