import pytest
import torch
import torch.nn.functional as F

from methods.idmm import IDMM


def _hand_cutmix_ce(model, x, target, eps):
    """The official recipe written out: one Beta(0.5, 0.5) lambda folded to >= 0.5, a box of side
    sqrt(1 - lambda) around a uniform centre, lambda from the clipped box, then the two smoothed CEs."""
    n, _, h, w = x.shape
    perm = torch.randperm(n)
    lam = float(torch.distributions.Beta(0.5, 0.5).sample())
    lam = max(lam, 1 - lam)
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    logp = model.classifier(model.encoder(mixed)).log_softmax(1)
    k = logp.shape[1]

    def ce(t):
        return -((1 - eps) * logp[torch.arange(n), t] + eps / k * logp.sum(1)).mean()

    return lam * ce(target) + (1 - lam) * ce(target[perm])


def test_idmm_loss_is_ce_of_group_a_plus_ce_of_group_b(tiny_vit):
    n_instances, eps = 9, 0.1
    model = IDMM(tiny_vit(), 32, n_instances, 3, {"cutmix_beta": 0.5, "label_smoothing": eps, "views": {},
                                                  "mix_parts": 1})
    index = torch.tensor([4, 0, 7])
    group_a, group_b = torch.randn(2 * 3, 3, 16, 16), torch.randn(4 * 3, 3, 16, 16)
    torch.manual_seed(3)
    loss = model.loss([group_a, group_b], index, None, 0.0)
    torch.manual_seed(3)
    expected = (_hand_cutmix_ce(model, group_a, index.repeat(2), eps)
                + _hand_cutmix_ce(model, group_b, index.repeat(4), eps))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_idmm_cutmixes_each_part_of_the_batch_on_its_own(tiny_vit):
    """The authors ran 4 GPUs of 64 images: each drew its own lambda and permutation over its own crops. Here 4
    images in 2 parts: part one holds images 0-1 (rows 0, 1, 4, 5 of a 2-crop group), part two images 2-3."""
    eps = 0.1
    model = IDMM(tiny_vit(), 32, 9, 3, {"cutmix_beta": 0.5, "label_smoothing": eps, "views": {}, "mix_parts": 2})
    index = torch.tensor([4, 0, 7, 2])
    group_a = torch.randn(2 * 4, 3, 16, 16)
    torch.manual_seed(5)
    loss = model.loss([group_a], index, None, 0.0)
    torch.manual_seed(5)
    parts = [torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])]
    expected = sum(_hand_cutmix_ce(model, group_a[rows], index.repeat(2)[rows], eps) for rows in parts) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_idmm_starts_at_log_n_and_learns_its_instances(tiny_vit):
    torch.manual_seed(0)
    model = IDMM(tiny_vit(), 32, 6, 6, {"cutmix_beta": 0.5, "label_smoothing": 0.0, "views": {}, "mix_parts": 1})
    x, index = torch.randn(6, 3, 16, 16), torch.arange(6)
    with torch.no_grad():
        plain = F.cross_entropy(model.classifier(model.encoder(x)), index)
    assert plain.item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model.loss([x.repeat(2, 1, 1, 1)], index, None, 0.0).backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model.classifier(model.encoder(x)), index)
    assert after < 0.5 * plain
