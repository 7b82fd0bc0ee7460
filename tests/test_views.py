import math

import pytest
import torch

from bench.data import views


def test_cutmix_box_area_matches_lambda():
    torch.manual_seed(0)
    for lam in [0.5, 0.6, 0.75, 0.9, 0.99]:
        for _ in range(50):
            y1, y2, x1, x2, lam_box = views.cutmix_box(lam, 112, 112)
            assert 0 <= y1 <= y2 <= 112 and 0 <= x1 <= x2 <= 112
            assert lam_box == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 112 ** 2)
            # an unclipped box has side sqrt(1 - lam): its area is 1 - lam up to integer rounding
            if y2 - y1 == int(112 * math.sqrt(1 - lam)) // 2 * 2 and x2 - x1 == int(112 * math.sqrt(1 - lam)) // 2 * 2:
                assert lam_box == pytest.approx(lam, abs=4 / 112)
            assert lam_box >= lam - 1e-9  # clipping only shrinks the box


def test_mix_lambda_is_folded_to_at_least_half():
    torch.manual_seed(0)
    lams = [views.mix_lambda(0.5) for _ in range(500)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0
    assert max(lams) - min(lams) > 0.3  # Beta(0.5, 0.5) is spread out, not a constant


def test_cutmix_pastes_a_box_from_the_permuted_batch():
    torch.manual_seed(1)
    x = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    mixed, perm, lam = views.cutmix(x, 0.5)
    for i in range(4):
        from_other = (mixed[i, 0] == x[perm[i], 0, 0, 0]).float().mean().item()
        if perm[i] != i:
            assert from_other == pytest.approx(1 - lam)


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


def test_random_boxes_stay_inside_and_follow_the_scale_range():
    torch.manual_seed(0)
    boxes = views.random_boxes(2000, 40, 60, (0.05, 0.4))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 60 + 1e-4).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 40 + 1e-4).all()
    frac = w * h / (40 * 60)
    assert frac.max() <= 0.4 + 1e-4 and frac.min() >= 0.05 * 0.7  # clamping to the image only shrinks boxes
    assert ((w / h).log().abs() <= torch.tensor(4 / 3).log() + 1e-4).float().mean() > 0.95


def test_blur_with_tiny_sigma_is_identity_and_large_sigma_smooths():
    x = torch.rand(2, 3, 16, 16)
    same = views._blur(x, torch.tensor([0.05, 0.05]))
    assert torch.allclose(same, x, atol=1e-4)
    smooth = views._blur(x, torch.tensor([2.0, 2.0]))
    assert smooth.std() < 0.5 * x.std()
    assert torch.allclose(smooth.mean((2, 3)), x.mean((2, 3)), atol=0.05)


@pytest.mark.parametrize("name", list(views.RANDAUGMENT_OPS))
def test_every_randaugment_op_keeps_shape_and_range_and_acts(name):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 0.8 + 0.1
    y = views.RANDAUGMENT_OPS[name](x, torch.full((6,), 0.9)).clamp(0, 1)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    if name != "identity":
        assert not torch.allclose(y, x, atol=1e-3), name


def test_equalize_spreads_the_histogram_and_posterize_quantizes():
    x = torch.rand(2, 3, 32, 32) * 0.2 + 0.4  # a narrow range of values
    eq = views._equalize(x)
    assert eq.min() < 0.05 and eq.max() > 0.95
    post = views.RANDAUGMENT_OPS["posterize"](x, torch.full((2,), 0.8))  # 3 bits dropped: multiples of 8/255
    assert torch.allclose(torch.remainder((post * 255).round(), 8), torch.zeros(1))


def test_randaugment_probability_gates_every_op():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)
    assert torch.equal(views.randaugment(x, p=0.0), x)
    changed = (views.randaugment(x, p=1.0) - x).abs().flatten(1).max(1).values > 1e-4
    assert changed.float().mean() > 0.8  # identity can be drawn twice; nearly everything else changes the image
