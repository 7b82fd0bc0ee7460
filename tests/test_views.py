import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from bench.data import views


def test_cutmix_box_area_matches_lambda():
    torch.manual_seed(0)
    unclipped = 0
    for lam in [0.5, 0.6, 0.75, 0.9, 0.99]:
        for _ in range(50):
            y1, y2, x1, x2, lam_box = views.cutmix_box(lam, 112, 112)
            assert 0 <= y1 <= y2 <= 112 and 0 <= x1 <= x2 <= 112
            assert lam_box == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 112 ** 2)
            # an unclipped box has side sqrt(1 - lam): its area is 1 - lam up to integer rounding
            if y2 - y1 == int(112 * math.sqrt(1 - lam)) // 2 * 2 and x2 - x1 == int(112 * math.sqrt(1 - lam)) // 2 * 2:
                assert lam_box == pytest.approx(lam, abs=4 / 112)
                unclipped += 1
            assert lam_box >= lam - 1e-9  # clipping only shrinks the box
    assert unclipped > 50  # boxes centred away from the edges, most of those of lam 0.99


def test_mix_lambda_is_folded_to_at_least_half():
    torch.manual_seed(0)
    lams = [views.mix_lambda(0.5) for _ in range(500)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0
    assert max(lams) - min(lams) > 0.3  # Beta(0.5, 0.5) is spread out, not a constant


def test_cutmix_pastes_a_box_from_the_permuted_batch():
    torch.manual_seed(1)
    x = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    mixed, perm, lam = views.cutmix(x, 0.5)
    assert lam < 1 and any(perm[i] != i for i in range(4))  # a box was pasted, from another image
    for i in range(4):
        from_other = (mixed[i, 0] == x[perm[i], 0, 0, 0]).float().mean().item()
        if perm[i] != i:
            assert from_other == pytest.approx(1 - lam)


def test_mix_in_parts_keeps_each_permutation_and_lambda_inside_its_part():
    torch.manual_seed(0)
    b, count, parts = 10, 3, 4
    x = torch.arange(count * b, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    mixed, perm, lam = views.mix_in_parts(x, count, parts, lambda t: views.cutmix(t, 0.5))
    image = torch.arange(count * b) % b
    part = torch.bucketize(image, torch.tensor([3, 6, 8]), right=True)  # tensor_split of 10 in 4: 3, 3, 2, 2
    assert torch.equal(part[perm], part)  # a crop is mixed only with crops of its own part
    for p in range(parts):
        assert len(set(lam[part == p].tolist())) == 1
    assert len(set(lam.tolist())) > 1
    assert torch.equal(torch.sort(perm).values, torch.arange(count * b))


def test_mixed_cross_entropy_matches_hand_computation():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    perm, lam, eps = torch.tensor([4, 3, 2, 1, 0]), 0.7, 0.1
    logp = logits.log_softmax(1)

    def ce(t):  # label smoothing: (1 - eps) on the target, eps spread evenly over all K classes
        return -((1 - eps) * logp[torch.arange(5), t] + eps / 7 * logp.sum(1)).mean()

    expected = lam * ce(y) + (1 - lam) * ce(y[perm])
    assert views.mixed_cross_entropy(logits, y, perm, lam, eps).item() == pytest.approx(expected.item(), rel=1e-6)


def test_make_views_shapes_order_and_range():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    spec = {"crops": [{"count": 2, "size": 16, "scale": [0.14, 1.0]}, {"count": 4, "size": 8, "scale": [0.05, 0.4]}],
            "flip": 0.5, "jitter": [0.8, 0.8, 0.8, 0.2], "jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.5,
            "blur_sigma": [0.1, 2.0], "solarize_p": 0.2}
    a, b = views.make_views(images, spec)
    assert a.shape == (10, 3, 16, 16) and b.shape == (20, 3, 8, 8)
    raw = views.normalize(torch.zeros(1, 3, 1, 1)), views.normalize(torch.ones(1, 3, 1, 1))
    assert (a >= raw[0] - 1e-5).all() and (a <= raw[1] + 1e-5).all()
    assert not torch.allclose(a[:5], a[5:])  # two crops of the same images differ


@pytest.mark.parametrize("size,scale", [((667, 500), (0.05, 0.4)), ((667, 500), (0.08, 1.0)),
                                        ((375, 500), (0.14, 1.0)), ((100, 420), (0.08, 1.0))])
def test_crop_boxes_have_torchvisions_statistics(size, scale):
    """Area fraction and aspect ratio of our boxes against torchvision's RandomResizedCrop.get_params on the
    same image size (4,000 each): means within 0.01 / 0.02, quartiles within 0.015 / 0.03; every box inside the
    image, in whole pixels. The last size is a 1:4.2 strip: most tries fail and the centre fallback shows."""
    from torchvision.transforms import RandomResizedCrop

    h, w = size
    n = 4000
    torch.manual_seed(0)
    ours = views.random_boxes(n, h, w, scale)
    bw, bh = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    assert (ours[:, :2] >= 0).all() and (ours[:, 2] <= w).all() and (ours[:, 3] <= h).all()
    assert torch.equal(ours, ours.round())
    img = torch.zeros(1, h, w)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]).float()
    area = (bw * bh / (h * w), ref[:, 2] * ref[:, 3] / (h * w))
    aspect = (bw / bh, ref[:, 3] / ref[:, 2])
    q = torch.tensor([0.25, 0.5, 0.75])
    for (a, b), tol in ((area, 0.01), (aspect, 0.02)):
        assert abs(a.mean() - b.mean()) < tol, (a.mean(), b.mean())
        assert (a.quantile(q) - b.quantile(q)).abs().max() < 1.5 * tol, (a.quantile(q), b.quantile(q))


def test_crops_come_from_the_whole_image_and_only_from_it():
    """A 30 x 40 image on a 40 x 40 canvas: crops reach its left and right quarters (outside the centre
    square a square store would keep) and never the canvas's empty rows below it."""
    from bench.data.resident import canvas

    torch.manual_seed(0)
    image = torch.full((3, 30, 40), 200, dtype=torch.uint8)
    image[0, :, :5] = image[0, :, 35:] = 10  # marks in the outer columns
    images, sizes = canvas([image, torch.zeros(3, 40, 40, dtype=torch.uint8)])
    spec = {"crops": [{"count": 400, "size": 8, "scale": [0.05, 0.4]}]}
    (crops,) = views.make_views(images[:1], spec, sizes[:1])
    raw = crops * torch.tensor(views.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(views.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert raw[:, 1].min() > 200 / 255 - 1e-4  # green is 200 all over the image: no black from the empty canvas
    assert (raw[:, 0] < 0.3).flatten(1).any(1).float().mean() > 0.1  # the marked outer columns are reached


def test_blur_with_tiny_sigma_is_identity_and_large_sigma_smooths():
    x = torch.rand(2, 3, 16, 16)
    same = views._blur(x, torch.tensor([0.05, 0.05]))
    assert torch.allclose(same, x, atol=1e-4)
    smooth = views._blur(x, torch.tensor([2.0, 2.0]))
    assert smooth.std() < 0.5 * x.std()
    assert torch.allclose(smooth.mean((2, 3)), x.mean((2, 3)), atol=0.05)


# --- RandAugment against oracles of the official ops ---------------------------------------------------------
# Each oracle is the PIL call that utils/data_utils.py of the official release (`SubPolicy`'s `func` and `ranges`,
# `Cutout`, `RandAugment.get_trans_list`) makes for an op at magnitude index m (1..9), written from reading it.

def _pil_affine(img, coeffs, bicubic=False):
    resample = Image.BICUBIC if bicubic else Image.NEAREST
    return img.transform(img.size, Image.AFFINE, coeffs, resample, fillcolor=(128, 128, 128))


def _pil_cutout(img, size, col, row):
    img, (w, h) = img.copy(), img.size
    px = img.load()
    for i in range(max(0, col - size // 2), min(w, col + size // 2)):
        for j in range(max(0, row - size // 2), min(h, row + size // 2)):
            px[i, j] = (125, 122, 113)
    return img


def _pil_rotate(img, degrees):  # rotate_with_fill: RGBA rotate (nearest), grey where nothing was rotated in
    rot = img.convert("RGBA").rotate(degrees)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


def _oracle(name, img, m, sign, col, row):
    lin = lambda lo, hi: np.linspace(lo, hi, 10)[m]  # noqa: E731  the reference's `ranges`
    enhance = 1 + lin(0.0, 0.9) * sign
    return {
        "invert": lambda: ImageOps.invert(img),
        "cutout": lambda: _pil_cutout(img, int(np.round(lin(0, 20))), col, row),
        "sharpness": lambda: ImageEnhance.Sharpness(img).enhance(enhance),
        "autocontrast": lambda: ImageOps.autocontrast(img),
        "posterize": lambda: ImageOps.posterize(img, int(np.round(lin(8, 4)))),
        "shear_x": lambda: _pil_affine(img, (1, lin(0, 0.3) * sign, 0, 0, 1, 0), bicubic=True),
        "shear_y": lambda: _pil_affine(img, (1, 0, 0, lin(0, 0.3) * sign, 1, 0), bicubic=True),
        "translate_x": lambda: _pil_affine(img, (1, 0, lin(0, 150 / 331) * img.size[0] * sign, 0, 1, 0)),
        "translate_y": lambda: _pil_affine(img, (1, 0, 0, 0, 1, lin(0, 150 / 331) * img.size[1] * sign)),
        "rotate": lambda: _pil_rotate(img, lin(0, 30)),
        "equalize": lambda: ImageOps.equalize(img),
        "contrast": lambda: ImageEnhance.Contrast(img).enhance(enhance),
        "color": lambda: ImageEnhance.Color(img).enhance(enhance),
        "solarize": lambda: ImageOps.solarize(img, lin(256, 0)),
        "brightness": lambda: ImageEnhance.Brightness(img).enhance(enhance),
    }[name]()


def _photo(size=48, seed=0):
    """A fixed test image: gradients, a disc, a bar and noise, over a narrow-ish range of levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([40 + 150 * xx, 60 + 120 * yy, 90 + 80 * (1 - xx) * yy], -1)
    a[(yy - 0.6) ** 2 + (xx - 0.35) ** 2 < 0.04] = (200, 40, 60)
    a[5:12, 20:44] = (30, 180, 220)
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


# tolerance per op, in levels of 255: the point and nearest-neighbour ops agree exactly but for float rounding;
# the bicubic shears differ by torch's cubic coefficient (-0.75 vs PIL's -0.5): mean under 1 level, max 8
EXACT = {"invert", "cutout", "posterize", "translate_x", "translate_y", "solarize", "equalize", "autocontrast"}


def test_randaugment_has_the_official_op_list():
    assert list(views.RANDAUGMENT_OPS) == [
        "invert", "cutout", "sharpness", "autocontrast", "posterize", "shear_x", "translate_x", "translate_y",
        "shear_y", "rotate", "equalize", "contrast", "color", "solarize", "brightness"]


@pytest.mark.parametrize("name", list(views.RANDAUGMENT_OPS))
@pytest.mark.parametrize("m,sign", [(1, 1), (5, -1), (9, 1), (9, -1)])
def test_randaugment_op_matches_the_official_pil_op(name, m, sign):
    img = _photo()
    col, row = 9, 40  # the cutout centre: column and row
    want = np.asarray(_oracle(name, img, m, sign, col, row), dtype=np.float64)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    rand = torch.tensor([[0.25 if sign < 0 else 0.75, (row + 0.5) / 48, (col + 0.5) / 48]])
    got = views._q(views.RANDAUGMENT_OPS[name](x, torch.tensor([float(m)]), rand))[0].permute(1, 2, 0).numpy() * 255
    diff = np.abs(got - want)
    if name in EXACT:
        assert diff.max() <= 1.01, (name, diff.max())
    elif name == "rotate":  # nearest: a pixel whose source lies on a boundary may round the other way
        assert (diff > 1.01).mean() < 0.01, (name, (diff > 1.01).mean())
    elif name.startswith("shear"):
        assert diff.mean() < 1.0 and diff.max() <= 8.01, (name, diff.mean(), diff.max())
    else:  # the enhance ops: float rounding may put a level on the other side of PIL's truncation
        assert diff.max() <= 1.01 and (diff > 0).mean() < 0.02, (name, diff.max(), (diff > 0).mean())
    assert not np.allclose(want, np.asarray(img)) or diff.max() <= 1.01  # the op acts, and so does ours


def test_randaugment_probability_gates_every_op():
    torch.manual_seed(0)
    x = views._q(torch.rand(64, 3, 16, 16))
    assert torch.equal(views.randaugment(x, p=0.0), x)
    changed = (views.randaugment(x, p=1.0) - x).abs().flatten(1).max(1).values > 1e-4
    assert changed.float().mean() > 0.9


def test_batched_randaugment_is_each_images_own_ops_in_turn():
    """The batch is augmented in one pass per slot (the geometric ops of all images in one warp per kind); each
    image must still get exactly the ops it drew, as if augmented alone."""
    torch.manual_seed(1)
    x = views._q(torch.rand(96, 3, 20, 20))
    torch.manual_seed(2)
    got = views.randaugment(x, ops=2, p=0.7)
    torch.manual_seed(2)  # the same draws, in randaugment's order: op, on, magnitude, rand, per slot
    names, want = list(views.RANDAUGMENT_OPS), x.clone()
    for _ in range(2):
        pick, on = torch.randint(len(names), (96,)), torch.rand(96) < 0.7
        m, rand = torch.randint(1, 10, (96,)).float(), torch.rand(96, 3)
        want = torch.stack([views._q(views.RANDAUGMENT_OPS[names[pick[i]]](want[i:i + 1], m[i:i + 1], rand[i:i + 1]))[0]
                            if on[i] else want[i] for i in range(96)])
    assert set(pick[on].tolist()) == set(range(len(names)))  # every op was exercised
    # the affine maps' einsum rounds a point on an image's edge either way with the batch's shape, so a pixel
    # there may take the grey fill instead of its neighbour's value (25 of 115,200 here, all after a shear)
    assert ((got - want).abs() > 1e-6).float().mean() < 1e-3


def test_each_photometric_op_does_what_it_says_at_probability_one_and_nothing_at_zero():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    assert torch.equal(views.augment(x, {"flip": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}), x)
    assert torch.equal(views.augment(x, {"flip": 1.0}), x.flip(3))
    grey = views.augment(x, {"grayscale_p": 1.0})
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2]) and not torch.equal(grey, x)
    assert torch.equal(views.augment(x, {"solarize_p": 1.0}), torch.where(x >= 0.5, 1 - x, x))
    # brightness alone: each image times one factor from [0.6, 1.4] (clipped at 1), factors differing by image
    bright = views.augment(x, {"jitter": [0.4, 0, 0, 0], "jitter_p": 1.0})
    factors = []
    for b, a in zip(bright, x):
        inside = (b < 0.999) & (a > 0.05)
        ratio = b[inside] / a[inside]
        assert torch.allclose(ratio, ratio.median().expand_as(ratio), rtol=1e-4) and 0.6 <= ratio.median() <= 1.4
        factors.append(ratio.median().item())
    assert max(factors) - min(factors) > 0.1
    # blur: neighbouring pixels closer, the mean kept
    blurred = views.augment(x, {"blur_p": 1.0, "blur_sigma": [1.0, 2.0]})
    step = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert step(blurred) < 0.5 * step(x) and blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
