"""Every baseline: one real training step, its loss against a hand computation of the reference's, its state."""
import copy
import math
import traceback

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from torch.utils._python_dispatch import TorchDispatchMode

from bench import plan as planner
from bench.data.views import make_views
from methods import METHODS
from methods.mocov3 import mocov3_loss
from methods.supcon import supcon_loss

PRETRAINING = [name for name, m in METHODS.items() if m.pretrains]


def _method_cfg(name):
    cfg = planner.load_preset("demo")["methods"][name]
    return {k: v for k, v in cfg.items() if k != "pretrain"}


def _method(name, tiny_vit, n=12, classes=3):
    return METHODS[name](tiny_vit(), 32, n, classes, _method_cfg(name))


@pytest.mark.parametrize("name", PRETRAINING)
def test_one_step_gives_a_finite_loss_and_moves_the_backbone(name, tiny_vit, tiny_images):
    torch.manual_seed(0)
    method = _method(name, tiny_vit)
    method.start_epoch(1)
    blocks = copy.deepcopy(method.encoder.blocks.state_dict())
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    index = torch.arange(len(tiny_images))
    loss = method.loss(make_views(tiny_images.images, method.views), index, tiny_images.labels, 0.5)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    opt.step()
    method.after_step(0.5)
    assert any(not torch.equal(blocks[k], v) for k, v in method.encoder.blocks.state_dict().items())


def test_supcon_with_one_image_per_label_is_nt_xent():
    torch.manual_seed(0)
    z0, z1 = torch.randn(6, 8), torch.randn(6, 8)
    labels = torch.arange(6).repeat(2)  # each image's only positive is its other view
    expected = NTXentLoss(temperature=0.5)(z0, z1)
    assert supcon_loss(torch.cat([z0, z1]), labels, 0.5).item() == pytest.approx(expected.item(), rel=1e-5)


def test_supcon_with_several_positives_matches_the_formula_written_out():
    torch.manual_seed(1)
    f = torch.randn(7, 5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    z = F.normalize(f, dim=1)
    t = 0.3
    terms = []
    for i in range(7):
        positives = [p for p in range(7) if p != i and labels[p] == labels[i]]
        if not positives:
            continue  # anchor 5 (label 2) has no positive and does not count
        denom = sum(torch.exp(z[i] @ z[a] / t) for a in range(7) if a != i)
        terms.append(-sum(torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in positives) / len(positives))
    expected = sum(terms) / len(terms)
    assert len(terms) == 6
    assert supcon_loss(f, labels, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mocov3_loss_matches_the_formula_written_out():
    torch.manual_seed(2)
    q, k, t = torch.randn(4, 6), torch.randn(4, 6), 0.2
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    ce = [-torch.log(torch.exp(qn[i] @ kn[i] / t) / sum(torch.exp(qn[i] @ kn[j] / t) for j in range(4)))
          for i in range(4)]
    expected = sum(ce) / 4 * 2 * t
    assert mocov3_loss(q, k, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert mocov3_loss(q, q, t) < mocov3_loss(q, k, t)  # aligned keys cost less


def test_simclr_loss_is_nt_xent_written_out(tiny_vit, tiny_images):
    """SimCLR's NT-Xent: each of the 2N crops against its other view, among the other 2N - 2 crops of the batch."""
    torch.manual_seed(3)
    method = _method("simclr", tiny_vit)
    views = make_views(tiny_images.images, method.views)
    z = F.normalize(method.head(method.embed(views)), dim=1).detach()
    n, t = len(z) // 2, method.cfg["temperature"]
    terms = [-torch.log(torch.exp(z[i] @ z[(i + n) % (2 * n)] / t)
                        / sum(torch.exp(z[i] @ z[j] / t) for j in range(2 * n) if j != i)) for i in range(2 * n)]
    expected = sum(terms) / (2 * n)
    assert method.loss(views, torch.arange(n), tiny_images.labels, 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mocov2_loss_is_infonce_against_the_queue_which_then_takes_the_keys(tiny_vit, tiny_images):
    """moco/builder.py: logits [q.k, q.queue] / T (q, k and the queue normalised), the key is class 0; then the
    batch's keys replace the oldest entries of the queue."""
    torch.manual_seed(4)
    method = _method("mocov2", tiny_vit)
    views = make_views(tiny_images.images, method.views)
    x_q, x_k = torch.cat(views).chunk(2)
    with torch.no_grad():
        q = F.normalize(method.head(method.encoder(x_q)), dim=1)
        k = F.normalize(method.key_head(method.key_encoder(x_k)), dim=1)
    bank = method.criterion.memory_bank
    queue, ptr, t = bank.bank.clone(), int(bank.bank_ptr), method.cfg["temperature"]
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / t
    expected = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    assert method.loss(views, torch.arange(len(q)), tiny_images.labels, 0).item() == pytest.approx(expected.item(),
                                                                                                 rel=1e-5)
    assert torch.allclose(bank.bank[ptr:ptr + len(k)], k, atol=1e-6) and int(bank.bank_ptr) == ptr + len(k)
    assert torch.equal(bank.bank[ptr + len(k):], queue[ptr + len(k):])


def test_dino_loss_centre_and_teacher_temperature_are_the_references(tiny_vit, tiny_images):
    """facebookresearch/dino main_dino.py, DINOLoss: the teacher's outputs centred and sharpened at a temperature
    warmed up linearly, cross-entropy of each student crop against each teacher crop but its own (student
    temperature 0.1), the mean over those pairs; then the centre moves toward the batch mean of the teacher's
    outputs by center_momentum."""
    torch.manual_seed(5)
    cfg = {**_method_cfg("dino"), "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_frac": 0.2}
    method = METHODS["dino"](tiny_vit(), 32, 12, 3, cfg)
    temps = [method.teacher_temp(p) for p in (0, 0.1, 0.2, 0.6, 1)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    views = make_views(tiny_images.images, method.views)
    n_global, crops = cfg["global_crops"], sum(len(v) for v in views) // len(tiny_images)
    centre = torch.randn_like(method.criterion.center) * 0.1
    method.criterion.center.copy_(centre)
    with torch.no_grad():
        student = method.head(method.embed(views)).chunk(crops)
        teacher = method.teacher_head(method.embed(views[:n_global], method.teacher)).chunk(n_global)
    targets = [F.softmax((t - centre.flatten()) / 0.055, dim=-1) for t in teacher]
    terms = [(-q * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()
             for i, q in enumerate(targets) for v, s in enumerate(student) if v != i]
    assert len(terms) == n_global * (crops - 1)
    loss = method.loss(views, torch.arange(len(tiny_images)), tiny_images.labels, 0.1)
    assert loss.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-5)
    m = cfg["center_momentum"]
    want = m * centre.flatten() + (1 - m) * torch.cat(teacher).mean(0)
    assert torch.allclose(method.criterion.center.flatten(), want, atol=1e-6)


@pytest.mark.parametrize("name,online,target", [("mocov2", ["encoder", "head"], ["key_encoder", "key_head"]),
                                                ("mocov3", ["encoder", "projector"], ["key_encoder", "key_projector"]),
                                                ("dino", ["encoder", "head"], ["teacher", "teacher_head"])])
def test_momentum_encoder_moves_by_exactly_the_ema(name, online, target, tiny_vit):
    method = _method(name, tiny_vit)
    with torch.no_grad():  # make online and target differ, as after some training
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {t: copy.deepcopy(getattr(method, t).state_dict()) for t in target}
    progress = 0.3
    method.after_step(progress)
    m0 = method.cfg["momentum"]  # MoCo v3 and DINO: to 1 along a half cosine (moco-v3 adjust_moco_momentum)
    m = m0 if name == "mocov2" else 1 - (1 - m0) * (1 + math.cos(math.pi * progress)) / 2
    for o, t in zip(online, target):
        src = dict(getattr(method, o).named_parameters())
        for k, v in getattr(method, t).named_parameters():
            assert torch.allclose(v, m * before[t][k] + (1 - m) * src[k], atol=1e-6), (t, k)


def test_mocov3_keeps_the_patch_projection_frozen(tiny_vit, tiny_images):
    method = _method("mocov3", tiny_vit)
    proj = copy.deepcopy(method.encoder.patch_embed.proj.state_dict())
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.loss(make_views(tiny_images.images, method.views), torch.arange(12), tiny_images.labels, 0).backward()
    opt.step()
    for k, v in method.encoder.patch_embed.proj.state_dict().items():
        assert torch.equal(v, proj[k])


def test_dino_centre_updates_and_comes_back_from_a_checkpoint(tmp_path, tiny_vit, tiny_images):
    from bench.engine import fit

    method = _method("dino", tiny_vit)
    assert torch.count_nonzero(method.criterion.center) == 0
    cfg = {"epochs": 1, "batch_size": 6, "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 0.04,
           "weight_decay_end": 0.4, "clip_grad": 3.0, "seed": 0}
    fit(method, tiny_images, cfg, tmp_path)
    centre = method.criterion.center.clone()
    assert torch.count_nonzero(centre) > 0
    restored = _method("dino", tiny_vit)
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    assert torch.equal(restored.criterion.center, centre)


def test_dino_parameter_groups_and_weight_decay_ramp_follow_the_reference(tmp_path, tiny_vit, tiny_images):
    """facebookresearch/dino, utils.get_params_groups: parameters whose name ends in .bias or with one dimension
    (norms) go without weight decay; main_dino.py ramps the weight decay of the first group only."""
    from bench.engine import fit

    method = _method("dino", tiny_vit)
    decay, no_decay = method.param_groups()
    names = {id(p): n for n, p in method.named_parameters()}
    expected_free = {n for n, p in method.named_parameters()
                     if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    assert {names[id(p)] for p in no_decay["params"]} == expected_free
    assert "encoder.pos_embed" in {names[id(p)] for p in decay["params"]}  # 3-D: decayed, as in the reference
    assert not any("teacher" in names[id(p)] for p in decay["params"] + no_decay["params"])
    cfg = {"epochs": 1, "batch_size": 6, "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 0.04,
           "weight_decay_end": 0.4, "clip_grad": 3.0, "seed": 0}
    fit(method, tiny_images, cfg, tmp_path)
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] > 0.04 and groups[1]["weight_decay"] == 0.0


def test_clip_each_caps_every_parameter_on_its_own():
    """DINO's utils.clip_gradients: each gradient times clip / (its norm + 1e-6) when that is below 1."""
    from bench.engine import clip_each

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 5), (7,), (3, 3, 2)]]
    for p, scale in zip(params, [10.0, 0.1, 2.0]):
        p.grad = torch.randn_like(p) * scale
    want = []
    for p in params:
        coef = 3.0 / (p.grad.norm(2) + 1e-6)
        want.append(p.grad * coef if coef < 1 else p.grad.clone())
    clip_each(params, 3.0)
    for p, w in zip(params, want):
        assert torch.allclose(p.grad, w, atol=1e-6)
    assert params[1].grad.norm() < 3.0  # a small gradient is left alone, unlike one global norm


@pytest.mark.parametrize("freeze,moves", [(1, False), (0, True)])
def test_dino_last_layer_gets_no_update_in_its_frozen_epochs(tmp_path, tiny_vit, tiny_images, freeze, moves):
    from bench.engine import fit

    method = _method("dino", tiny_vit)
    method.cfg["freeze_last_layer"] = freeze
    method.head.freeze_last_layer = freeze
    before = {k: v.clone() for k, v in method.head.last_layer.state_dict().items()}
    cfg = {"epochs": 1, "batch_size": 6, "lr": 1e-2, "warmup_epochs": 0, "weight_decay": 0.04, "seed": 0}
    fit(method, tiny_images, cfg, tmp_path)
    after = method.head.last_layer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before) == moves


@pytest.mark.parametrize("export", ["teacher", "student"])
def test_dino_exports_the_network_the_knob_names(tiny_vit, export):
    method = METHODS["dino"](tiny_vit(), 32, 12, 3, {**_method_cfg("dino"), "export": export})
    assert method.backbone() is (method.teacher if export == "teacher" else method.encoder)


@pytest.mark.parametrize("name,teacher", [("dino", "teacher"), ("mocov2", "key_encoder"), ("mocov3", "key_encoder")])
def test_teachers_and_key_encoders_give_the_same_target_twice(name, teacher):
    """The student keeps drop path 0.1; its momentum copy has none (DINO's main_dino.py builds the teacher with
    drop_path_rate 0; MoCo v3's ViTs have no drop path), so two passes on one batch give the same targets."""
    from bench.models import create

    torch.manual_seed(0)
    backbone = create("deit_tiny_patch16_224", 16, 0, 0.1, {"patch_size": 4, "embed_dim": 32, "depth": 2,
                                                           "num_heads": 2})
    method = _method(name, lambda: backbone).train()
    x = torch.rand(64, 3, 16, 16)  # 64 samples: the student drops some path in each pass, all but surely
    net = getattr(method, teacher)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        assert not torch.equal(method.encoder(x), method.encoder(x))  # the student still drops paths
    assert not any(p.requires_grad for p in net.parameters())


def test_idmm_head_starts_like_a_deit_head(tiny_vit):
    """Official IDMM: the N-way classifier is the backbone's own head, timm's trunc-normal(0.02) and zero bias."""
    torch.manual_seed(0)
    head = _method("idmm", tiny_vit, n=4000).classifier
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert head.weight.abs().max() <= 2 and torch.equal(head.bias, torch.zeros(4000))


def test_mocov3_freezes_the_patch_projection_of_vits_only():
    from bench.models import create

    vit = _method("mocov3", lambda: create("deit_tiny_patch16_224", 16, 0, 0.0, {"patch_size": 4, "embed_dim": 32,
                                                                               "depth": 1, "num_heads": 2}))
    assert not any(p.requires_grad for p in vit.encoder.patch_embed.proj.parameters())
    pvt_kwargs = planner.load_preset("demo")["backbones"]["pvt_v2_b0"]["kwargs"]
    pvt = create("pvt_v2_b0", 16, 0, 0.0, pvt_kwargs)
    method = METHODS["mocov3"](pvt, pvt.num_features, 12, 3, _method_cfg("mocov3"))
    assert all(p.requires_grad for p in method.encoder.patch_embed.proj.parameters())


def test_mocov3_builds_its_vits_as_moco_v3_does(tiny_vit, tiny_images):
    """moco-v3 vits.py (VisionTransformerMoCo, stop_grad_conv1): a fixed 2-D sin-cos position table, xavier-uniform
    Linears with q, k, v as separate matrices, the class token at std 1e-6, a frozen xavier-uniform patch projection
    with zero bias. It trained timm's DeiT as built: a learnt table, trunc-normal 0.02, a random projection bias."""
    import math

    method = _method("mocov3", tiny_vit)  # 16 px, patch 4, width 32: a 4 x 4 grid
    vit, pos = method.encoder, method.encoder.pos_embed[0]
    # the oracle, written from the reference's description: token (r, c) holds sin and cos of r * w_i, then of
    # c * w_i, over the dim/4 frequencies w_i = 10000 ** (-i / (dim/4)); the class token's row is zero
    w = [10000 ** (-i / 8) for i in range(8)]
    for r in range(4):
        for c in range(4):
            want = ([math.sin(r * x) for x in w] + [math.cos(r * x) for x in w] + [math.sin(c * x) for x in w]
                    + [math.cos(c * x) for x in w])
            assert torch.allclose(pos[1 + 4 * r + c], torch.tensor(want), atol=1e-6), (r, c)
    assert torch.equal(pos[0], torch.zeros(32)) and not vit.pos_embed.requires_grad
    assert 0 < vit.cls_token.abs().max() < 1e-5
    for name, m in vit.named_modules():
        if isinstance(m, torch.nn.Linear):  # uniform in +-bound: reaches near it, never past it
            bound = math.sqrt(6 / ((m.out_features // 3 if name.endswith("qkv") else m.out_features) + m.in_features))
            assert 0.9 * bound < m.weight.abs().max() <= bound and torch.equal(m.bias, torch.zeros_like(m.bias)), name
    proj = vit.patch_embed.proj
    assert 0.9 * math.sqrt(6 / (3 * 16 + 32)) < proj.weight.abs().max() <= math.sqrt(6 / (3 * 16 + 32))
    assert torch.equal(proj.bias, torch.zeros(32)) and not any(p.requires_grad for p in proj.parameters())
    assert torch.equal(method.key_encoder.pos_embed, vit.pos_embed)
    table = vit.pos_embed.clone()
    opt = torch.optim.AdamW([p for g in method.param_groups() for p in g["params"]], lr=1e-2, weight_decay=0.1)
    method.loss(make_views(tiny_images.images, method.views), torch.arange(12), tiny_images.labels, 0).backward()
    opt.step()
    assert torch.equal(vit.pos_embed, table)  # neither learnt nor decayed
    import timm

    clip_like = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=16, patch_size=4,
                                  embed_dim=32, depth=1, num_heads=2, num_classes=0)  # pre-norm: no patch bias
    METHODS["mocov3"](clip_like, 32, 12, 3, _method_cfg("mocov3"))
    assert not clip_like.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize("name,head", [("simclr", "head"), ("mocov2", "head"), ("mocov3", "projector")])
def test_a_head_width_of_null_is_the_encoders(name, head, tiny_vit):
    """SimCLR's and MoCo v2's references size the head's hidden layer as the encoder's output (2048 was
    ResNet-50's width, which bench gave a 192-wide DeiT-Tiny); null says so, for any method with a hidden_dim."""
    cfg = {**_method_cfg(name), "hidden_dim": None}
    method = METHODS[name](tiny_vit(), 32, 12, 3, cfg)
    widths = [m.out_features for m in getattr(method, head).modules() if isinstance(m, torch.nn.Linear)]
    assert widths[:-1] and set(widths[:-1]) == {32}


def test_dino_loss_runs_in_fp32_under_autocast(tiny_vit, tiny_images):
    method = _method("dino", tiny_vit)
    seen = []
    method.criterion.register_forward_pre_hook(lambda _m, args: seen.extend(t.dtype for t in args[0] + args[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.loss(make_views(tiny_images.images, method.views), torch.arange(12), tiny_images.labels, 0.1)
    assert seen and set(seen) == {torch.float32} and loss.dtype == torch.float32


def test_dino_uses_its_own_lr_on_every_backbone():
    preset = planner.load_preset("paper")
    jobs = planner.plan("transfer", preset, ["dino"], None, None, [0])
    pre = [j for j in jobs if j.config["stage"] == "pretrain"]
    assert {j.config["backbone"] for j in pre} >= {"pvt_v2_b0", "pvt_v2_b3"}
    assert {j.config["lr"] for j in pre} == {5e-4}


@pytest.mark.parametrize("name", PRETRAINING)
def test_every_method_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(name, tiny_vit, tiny_images, tmp_path,
                                                                             monkeypatch):
    """Everything a method carries from step to step (MoCo v2's queue of keys and where it writes next, DINO's
    centre, the momentum encoders) is in the checkpoint: a run stopped after 4 steps and resumed ends where the
    uninterrupted run ends, bit for bit."""
    import bench.engine as engine

    cfg = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 1, "weight_decay": 1e-3, "seed": 0}

    def run(where):
        torch.manual_seed(0)
        method = _method(name, tiny_vit)
        engine.fit(method, tiny_images, cfg, tmp_path / where)
        return method.state_dict()

    ref = run("ref")
    real, calls = engine.make_views, [0]

    def stop_after_four(*args):
        calls[0] += 1
        if calls[0] == 4:
            engine.request_stop()
        return real(*args)

    monkeypatch.setattr(engine, "make_views", stop_after_four)
    with pytest.raises(engine.Interrupted):
        run("stopped")
    engine.clear_stop_requests()
    monkeypatch.setattr(engine, "make_views", real)
    resumed = run("stopped")
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


class _HostCopies(TorchDispatchMode):
    """Every blocking copy from host memory to the meta device, with where it was made."""

    def __init__(self):
        super().__init__()
        self.blocking = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device.type == "meta"
                and not (kwargs or {}).get("non_blocking")):
            self.blocking.append("".join(traceback.format_stack(limit=8)[:-1]))
        return out


@pytest.mark.parametrize("name", [*PRETRAINING, "finetune"])
def test_a_training_step_never_makes_the_host_wait_for_the_gpu(name):
    """On a GPU, a blocking copy from host memory (`.to(dev)`, `torch.tensor(..., device=dev)`) or a read of a
    device value (`.item()`, a boolean mask's count) waits for every kernel queued before it, so the host cannot
    prepare the next step while the GPU runs this one. On the meta device (tensors without data) reading a value
    fails and the dispatcher sees every copy: after a first step (constants are made once per device), a
    step's views (the whole recipe, RandAugment's every op at a batch of 256), loss, backward, clipping and
    momentum updates copy host draws only without blocking and read nothing back. SimCLR's and MoCo v2's
    lightly losses read once per step (NTXentLoss's diagonal mask, the memory bank's write position)."""
    from bench import engine
    from bench.benchmark import _build, _views_of
    from bench.data import ImageSet

    preset = planner.load_preset("demo")
    row = {"method": "random" if name == "finetune" else name, "backbone": "deit_tiny_patch16_224", "id": name,
           "pretrain_epochs": 1}
    cfg = (planner._finetune_config(row, preset, "digits", {"res": 224, "epochs": 1}, "random", 0)
           if name == "finetune" else planner._pretrain_config(row, preset, "digits", 0))
    images = torch.empty(256, 3, 40, 30, dtype=torch.uint8, device="meta")
    sizes = torch.empty(256, 2, dtype=torch.long, device="meta")
    index, labels = torch.arange(256, device="meta"), torch.zeros(256, dtype=torch.long, device="meta")
    model = _build(cfg, ImageSet(images, labels, [str(k) for k in range(10)], "meta", sizes=sizes))
    model.to("meta").train()
    spec = _views_of(cfg)
    groups = model.param_groups()
    opt = torch.optim.AdamW(groups, lr=1e-3, foreach=True)  # fused AdamW has no meta kernel
    params = [p for g in groups for p in g["params"]]
    for step in range(2):
        with _HostCopies() as watch:
            try:
                model.start_epoch(step)
                loss = model.loss(make_views(images, spec, sizes), index, labels, 0.5)
                engine.update(model, opt, params, loss, cfg, step, 0.5)
            except (RuntimeError, NotImplementedError) as e:  # a value read back: meta tensors have none
                where = [f.filename for f in traceback.extract_tb(e.__traceback__)]
                assert name in ("simclr", "mocov2") and any("/lightly/" in f for f in where), where[-4:]
                return
    assert name not in ("simclr", "mocov2"), "lightly's loss no longer reads the device: update the docstring"
    assert not watch.blocking, watch.blocking[0]
