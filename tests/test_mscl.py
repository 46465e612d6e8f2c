"""Tests of mscl.py: FPN shapes, wiring and fusion order, stop-gradient, Eq. (7), exact SimSiam
equivalence, training signal, lr recipe, run names, outputs and export, DDP, resume, bad input."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import mrpose
import mscl
from common.datasets import list_images
from common.utils import UserError, check_resume_args, seed_everything
from data.demo import make_demo
from helpers import assert_one_line_error, run_script

SMALL = ["--backbone", "resnet18", "--crop-size", "32", "--batch-size", "8", "--workers", "0",
         "--print-freq", "1"]


def run(args, expect=0, torchrun=False):
    return run_script("mscl.py", args, expect, torchrun)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 demo training images (192 px) and the flags that point mscl.py at them."""
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=16, n_val=4)
    return Path(root) / "train2017", ["--data", "folder", "--images", str(Path(root) / "train2017")]


def two_views(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


# ----------------------------------------------------------------------------------------------
#   model

def test_fpn_levels_at_224_and_eq1_wiring():
    torch.manual_seed(0)
    model = mscl.MSCL("resnet50").eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 224, 224))
        assert ([tuple(f.shape[1:]) for f in feats] == [(256, 56, 56), (512, 28, 28),
                                                        (1024, 14, 14), (2048, 7, 7)])
        vectors = model.neck(feats)
        assert [tuple(v.shape) for v in vectors] == [(2, 512)] * 4
        p1, p2, z1, z2 = model(torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224))
        assert [tuple(t.shape) for t in p1 + p2 + z1 + z2] == [(2, 512)] * 16
        # Eq. (1): F_i fuses f_i with f_{i+1} only (not the accumulated top-down path of the
        # original FPN)
        changed = [f.clone() for f in feats]
        changed[3] = torch.randn_like(feats[3])  # f4 changes: F3, F4 change; F1, F2 do not
        after = model.neck(changed)
        assert torch.equal(after[0], vectors[0]) and torch.equal(after[1], vectors[1])
        assert not torch.allclose(after[2], vectors[2]) and not torch.allclose(after[3], vectors[3])
        changed = [f.clone() for f in feats]
        changed[1] = torch.randn_like(feats[1])  # f2 changes: F1 and F2
        after = model.neck(changed)
        assert not torch.allclose(after[0], vectors[0]) and not torch.allclose(after[1], vectors[1])
        assert torch.equal(after[2], vectors[2]) and torch.equal(after[3], vectors[3])
    # heads: Eq. (3) 512-512-512 with a non-affine output BN, Eq. (4) 512-128-512, one pair per
    # scale
    assert len(model.projectors) == len(model.predictors) == 4
    proj, pred = model.projectors[0], model.predictors[0]
    assert [m.out_features for m in proj if isinstance(m, nn.Linear)] == [512, 512, 512]
    assert not proj[7].affine and not proj[6].bias.requires_grad
    assert ([(m.in_features, m.out_features) for m in pred
             if isinstance(m, nn.Linear)] == [(512, 128), (128, 512)])
    shared = mscl.MSCL("resnet18", shared_heads=True)
    assert len(shared.projectors) == len(shared.predictors) == 1


def test_fusion_order_conv_pool_and_pool_conv():
    """conv-pool runs Conv2 (3x3) on the fused map, then pools; pool-conv pools, then a 1x1 Conv2.
    Each equals an independent reference of its order, and only conv-pool escapes the
    width-dimensional subspace."""
    torch.manual_seed(0)
    channels, sizes, width, out_dim = [4, 8, 16, 32], [16, 8, 4, 2], 6, 24
    g = torch.Generator().manual_seed(1)
    # float64, so that the numerical rank below is exact
    feats = [torch.randn(64, c, s, s, generator=g, dtype=torch.float64) for c,
             s in zip(channels, sizes)]
    outs = {}
    for fusion in ("conv-pool", "pool-conv"):
        fpn = mscl.FeaturePyramid(channels, width, out_dim, fusion).double()
        seen = []
        for conv in fpn.conv2:
            conv.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
        with torch.no_grad():
            vectors = fpn(feats)
            lat = [c(f) for c, f in zip(fpn.conv1, feats)]
            fused = ([lat[i] + F.interpolate(lat[i + 1], scale_factor=2.0, mode="nearest")
                      for i in range(3)] + [lat[3]])
            if fusion == "conv-pool":  # Conv2 sees the map: 3x3, padding 1, then global max pooling
                assert seen == [(s, s) for s in sizes]
                assert all(c.kernel_size == (3, 3) for c in fpn.conv2)
                ref = [F.conv2d(m, c.weight, c.bias, padding=1).amax(dim=(2, 3)) for m,
                       c in zip(fused, fpn.conv2)]
            # the order before --fusion existed: global max pooling, then a 1x1 Conv2 on the vector
            else:
                assert seen == [(1, 1)] * 4
                ref = [m.amax(dim=(2, 3)) @ c.weight[:, :, 0, 0].T + c.bias for m,
                       c in zip(fused, fpn.conv2)]
        for v, r in zip(vectors, ref):
            assert v.shape == (64, out_dim) and torch.allclose(v, r, rtol=1e-5, atol=1e-5)
        # rank of the centred batch of F_i vectors: pool-conv is confined to `width` dimensions
        outs[fusion] = [torch.linalg.matrix_rank(v - v.mean(0)).item() for v in vectors]
    assert all(r <= width for r in outs["pool-conv"]), outs
    assert all(r > width for r in outs["conv-pool"]), outs
    assert mscl.get_args([]).fusion == "conv-pool"


def test_stop_gradient_target_side_carries_no_gradient():
    torch.manual_seed(0)
    model = mscl.MSCL("resnet18").train()
    p1, p2, z1, z2 = model(*two_views())
    weights = [0.1, 0.2, 0.2, 0.5]
    loss, _ = mscl.mscl_loss(p1, p2, z1, z2, weights)
    for k in range(4):
        for p, z in ((p1[k], z1[k]), (p2[k], z2[k])):
            # every path from z to the loss
            g_z = torch.autograd.grad(loss, z, retain_graph=True)[0]
            g_p = torch.autograd.grad(loss, p, retain_graph=True)[0]
            via_predictor = torch.autograd.grad(p, z, grad_outputs=g_p, retain_graph=True)[0]
            assert g_z.abs().sum() > 0
            # nothing through the target side
            assert torch.allclose(g_z, via_predictor, rtol=1e-5, atol=1e-9)
    # the check has teeth: without the stop-gradient the gradient at z differs
    no_sg = sum(w * 0.5 * (-F.cosine_similarity(a, zb).mean() - F.cosine_similarity(b, za).mean())
                for w, a, b, za, zb in zip(weights, p1, p2, z1, z2))
    g_z = torch.autograd.grad(no_sg, z1[3], retain_graph=True)[0]
    g_p = torch.autograd.grad(no_sg, p1[3], retain_graph=True)[0]
    assert not torch.allclose(g_z, torch.autograd.grad(p1[3], z1[3], grad_outputs=g_p)[0],
                              rtol=1e-3, atol=1e-7)
    # at the loss itself: leaf targets get no gradient at all, predictions do
    p = [torch.randn(4, 16, requires_grad=True) for _ in range(2)]
    z = [torch.randn(4, 16, requires_grad=True) for _ in range(2)]
    loss, _ = mscl.mscl_loss([p[0]], [p[1]], [z[0]], [z[1]], [1.0])
    grads = torch.autograd.grad(loss, p + z, allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None


def test_eq7_weights_normalised_and_total_is_weighted_sum():
    args = mscl.get_args([])
    assert mscl.scale_weights(args) == pytest.approx([0.1, 0.2, 0.2, 0.5])
    w = mscl.scale_weights(mscl.get_args(["--scale-weights", "2", "2", "2", "4"]))
    assert sum(w) == pytest.approx(1) and w == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert (mscl.scale_weights(mscl.get_args(["--single-scale", "--scale-weights", "1", "1", "1",
                                              "7"])) == [1.0])
    with pytest.raises(UserError):
        mscl.get_args(["--scale-weights", "1", "-1", "1", "1"])
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = ([torch.randn(6, 32, generator=g) for _ in range(4)] for _ in range(4))
    # as Table 4 states them
    total, per_scale = mscl.mscl_loss(p1, p2, z1, z2, [1.0, 2.0, 2.0, 5.0])
    for k in range(4):  # Eq. (6) per scale
        expect = (0.5 * -F.cosine_similarity(p1[k],
                                             z2[k]).mean() + 0.5
                  * -F.cosine_similarity(p2[k], z1[k]).mean())
        assert torch.allclose(per_scale[k], expect)
    assert torch.allclose(total, sum(w * l for w, l in zip([0.1, 0.2, 0.2, 0.5], per_scale)))
    # the loss normalises the weights itself: proportions, already normalised or scaled, give one
    # total
    for weights in (mscl.scale_weights(args), mscl.DEFAULT_SCALE_WEIGHTS, [10.0, 20.0, 20.0, 50.0]):
        assert torch.allclose(mscl.mscl_loss(p1, p2, z1, z2, weights)[0], total)


# An independent SimSiam, as facebookresearch/simsiam simsiam/builder.py and main_simsiam.py write
# it.
class SimSiam(nn.Module):
    def __init__(self, base_encoder, dim=2048, pred_dim=512):
        super().__init__()
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(nn.Linear(prev_dim, prev_dim, bias=False),
                                        nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
                                        nn.Linear(prev_dim, prev_dim, bias=False),
                                        nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
                                        self.encoder.fc, nn.BatchNorm1d(dim, affine=False))
        self.encoder.fc[6].bias.requires_grad = False
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False),
                                       nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


@pytest.mark.parametrize("fusion", ["conv-pool", "pool-conv"])
def test_single_scale_no_fpn_is_exactly_simsiam(fusion):
    """Whatever --fusion says (it only changes the FPN, which SimSiam does not have)."""
    torch.manual_seed(0)
    ref = SimSiam(torchvision.models.resnet18).train()
    simsiam_flags = ["--backbone", "resnet18", "--single-scale", "--no-fpn", "--dim", "2048",
                     "--pred-dim", "512"]
    args = mscl.get_args(simsiam_flags + ["--fusion", fusion])
    assert mscl.run_name(args) == "simsiam"
    ours = mscl.build_model(args).train()
    # same structure: a one-to-one key mapping, same shapes, same trainable set, same zero-init
    # residual BNs
    def rename(k):
        if k.startswith("encoder.fc."):
            return "projectors.0." + k[len("encoder.fc."):]
        if k.startswith("predictor."):
            return "predictors.0." + k[len("predictor."):]
        return "backbone." + k[len("encoder."):]
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert sorted(map(rename, ref_state)) == sorted(our_state)
    assert all(ref_state[k].shape == our_state[rename(k)].shape for k in ref_state)
    # zero_init_residual and the non-affine output BN reproduced by our constructor
    for k in ref_state:
        if k.endswith(("bn2.weight", "bn3.weight")) and "layer" in k:
            assert torch.equal(ref_state[k], our_state[rename(k)]), k
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert {rename(k) for k, p in ref_params.items() if p.requires_grad} == \
        {k for k, p in our_params.items() if p.requires_grad}
    ours.load_state_dict({rename(k): v for k, v in ref_state.items()})

    x1, x2 = two_views(8, 64)
    p1, p2, z1, z2 = ref(x1, x2)
    criterion = nn.CosineSimilarity(dim=1)
    ref_loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
    ref_loss.backward()
    q1, q2, y1, y2 = ours(x1, x2)
    loss, _ = mscl.mscl_loss(q1, q2, y1, y2, mscl.scale_weights(args))
    loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-6), (loss.item(), ref_loss.item())
    n = 0
    for k, p in ref_params.items():
        if p.grad is None:
            assert our_params[rename(k)].grad is None, k
            continue
        q = our_params[rename(k)].grad
        assert torch.allclose(q, p.grad, rtol=1e-4, atol=1e-7), (k, (q - p.grad).abs().max().item())
        n += 1
    assert n == sum(p.requires_grad for p in ref_params.values())
    for k, v in ref.state_dict().items():  # BN running statistics too
        assert (torch.allclose(v.float(), ours.state_dict()[rename(k)].float(), rtol=1e-5,
                               atol=1e-6)), k


def test_few_steps_lower_the_held_out_loss_without_collapse(images):
    """24 steps, each on fresh views of 12 images, lower the loss on a held-out batch of other views
    of them, and z keeps the spread of a healthy representation (SimSiam Sec. 4.1: std of the
    normalised z about 1/sqrt(d), 0 on collapse). Measured over seeds 0-3 of this setting: the
    held-out loss falls by 0.027 to 0.19; on 4 unseen images it does not fall reliably within 40
    steps, so the held-out views are of the training images."""
    folder, _ = images
    torch.manual_seed(0)
    files = sorted(str(p) for p in folder.iterdir())[:12]
    augment, collate = mscl.moco_v2_augmentation(32), torch.utils.data.default_collate
    data = mscl.TwoViews(files, augment)
    test = [collate([data[i] for i in range(12)]) for _ in range(2)]  # never trained on
    args = mscl.get_args(["--backbone", "resnet18", "--dim", "128", "--pred-dim", "32"])
    model = mscl.build_model(args)
    optimizer = mscl.build_optimizer(model, 0.3, args)
    weights = mscl.scale_weights(args)

    def held_out_loss():  # train-mode BN, as the training loss is computed; no update of any state
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            loss = (sum(mscl.mscl_loss(*model(x1, x2), weights)[0].item() for x1,
                        x2 in test) / len(test))
            z = model(*test[0])[2]
        model.load_state_dict(state)
        return loss, [mscl.normalised_std(zi).item() for zi in z]

    before, _ = held_out_loss()
    for _ in range(24):
        loss, _ = mscl.mscl_loss(*model(*collate([data[i] for i in range(12)])), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, spread = held_out_loss()
    assert after < before - 0.02, (before, after)
    # healthy ~1/sqrt(d); collapse -> 0
    assert all(v > 0.8 / args.dim ** 0.5 for v in spread), spread


def test_liftable_block_runs_alone_with_torch_imports_only():
    """The FPN, heads and loss of mscl.py, cut out as a reader would copy them, run with torch alone
    and match the script's (the weights passed as the paper states them)."""
    import inspect
    source = inspect.getsource(mscl)
    block = source[source.index("# Liftable block"):source.index("# End of the liftable block.")]
    assert "import" not in block.split("\n", 3)[3] and "args" not in block
    namespace = {}
    exec("import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n" + block,
         namespace)
    torch.manual_seed(0)
    model = mscl.MSCL("resnet18").train()
    fpn = namespace["FeaturePyramid"]([64, 128, 256, 512], width=256, out_dim=512,
                                      fusion="conv-pool")
    proj = [namespace["projector"](512, 512) for _ in range(4)]
    pred = [namespace["predictor"](512, 128) for _ in range(4)]
    fpn.load_state_dict(model.neck.state_dict())
    for mine, theirs in zip(proj + pred, list(model.projectors) + list(model.predictors)):
        mine.load_state_dict(theirs.state_dict())
    x1, x2 = two_views()
    feats1, feats2 = model.backbone(x1), model.backbone(x2)
    z1, z2 = ([h(v) for h, v in zip(proj, fpn(f))] for f in (feats1, feats2))
    p1, p2 = ([h(z) for h, z in zip(pred, zs)] for zs in (z1, z2))
    total, _ = namespace["mscl_loss"](p1, p2, z1, z2, weights=[1.0, 2.0, 2.0, 5.0])
    ref, _ = mscl.mscl_loss(*model(x1, x2), mscl.scale_weights(mscl.get_args([])))
    torch.testing.assert_close(total, ref)
    assert (namespace["normalised_std"](z1[3])
            == pytest.approx(mscl.normalised_std(z1[3]).item()))


def test_equations_tagged_once_in_the_papers_order():
    """Each of Eqs. (1)-(7) is tagged `# Eq. (n)` once, where it is computed, in the paper's order,
    and all inside the liftable block."""
    import inspect
    source = inspect.getsource(mscl)
    tags = re.findall(r"# Eq\. \((\d+)\)", source)
    assert tags == [str(n) for n in range(1, 8)], tags
    block = source[source.index("# Liftable block"):source.index("# End of the liftable block.")]
    assert re.findall(r"# Eq\. \((\d+)\)", block) == tags


def test_collapse_monitor_draws_no_random_number():
    """The training monitor (std of the normalised z) leaves the global RNGs as they were, so that
    logging it changes no later draw."""
    import random
    import numpy as np
    z = torch.randn(16, 32)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    std = mscl.normalised_std(z)
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate() and (states[2] == np.random.get_state()[1]).all()
    assert std.item() == pytest.approx(F.normalize(z, dim=1).std(dim=0).mean().item())
    assert mscl.normalised_std(torch.ones(16, 32)).item() == 0  # collapse


def test_cosine_schedule_fixed_predictor_lr_and_batch_scaling():
    # SimSiam's 100-epoch recipe (and MMSelfSup's configs) fix the predictor's lr: on in the presets
    assert all(mscl.get_args(["--data", d]).fix_pred_lr for d in ("imagenet", "coco"))
    model = mscl.MSCL("resnet18")
    for flags, fixed in (([], True), (["--no-fix-pred-lr"], False)):
        opt = mscl.build_optimizer(model, 0.1, mscl.get_args(["--data", "imagenet"] + flags))
        assert opt.param_groups[1]["params"] == list(model.predictors.parameters())
        assert mscl.adjust_learning_rate(opt, 0.1, 0, 10) == pytest.approx(0.1)
        assert mscl.adjust_learning_rate(opt, 0.1, 5, 10) == pytest.approx(0.05)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 if fixed else 0.05)
    # the lr scales with the batch actually used: 10 on 4 ranks is 2 per rank, 8 in all
    args = mscl.get_args(["--data", "imagenet", "--batch-size", "10"])
    assert mscl.batch_and_lr(args, 4) == (2, 8, pytest.approx(0.05 * 8 / 256))
    assert mscl.batch_and_lr(args, 1) == (10, 10, pytest.approx(0.05 * 10 / 256))


def test_run_names_follow_table5():
    name = lambda *flags: mscl.run_name(mscl.get_args(list(flags)))  # noqa: E731
    # Table 5 #1
    assert name("--single-scale", "--no-fpn", "--dim", "2048", "--pred-dim", "512") == "simsiam"
    assert name("--no-fpn") == "ms-nofpn"  # #2
    assert name() == "mscl"  # #3 (--data coco), #4
    assert (name("--single-scale") == "single-fpn"
            and name("--single-scale", "--no-fpn") == "single-nofpn")
    assert (name("--fusion", "pool-conv") == "mscl-pool-conv"
            and name("--no-fpn", "--fusion", "pool-conv") == "ms-nofpn")
    assert name("--scale-weights", "2", "2", "2", "4") == "mscl-l2-2-2-4"  # Table 4
    assert mscl.get_args(["--data", "coco"]).out == "runs/mscl-coco-mscl-resnet50"


def test_resume_refuses_changed_settings():
    base = ["--data", "imagenet"]
    saved = vars(mscl.get_args(base))
    resume = mscl.RESUME_KEYS, ("fpn",)
    check_resume_args("ckpt.pth", saved, mscl.get_args(base + ["--iters", "5", "--workers", "1"]),
                      *resume)
    for flags, needle in [(["--backbone", "resnet18"], "--backbone"),
                          (["--fusion", "pool-conv"], "--fusion"),
                          (["--single-scale"], "--single-scale"),
                          (["--no-fpn"], "--no-fpn False, this run has True"),
                          (["--shared-heads"], "--shared-heads"), (["--dim", "256"], "--dim"),
                          (["--pred-dim", "64"], "--pred-dim"),
                          (["--fpn-width", "128"], "--fpn-width"),
                          (["--scale-weights", "2", "2", "2", "4"], "--scale-weights"),
                          (["--batch-size", "128"], "--batch-size"), (["--lr", "0.1"], "--lr"),
                          (["--no-fix-pred-lr"], "--fix-pred-lr"),
                          (["--epochs", "200"], "--epochs"), (["--amp"], "--amp"),
                          (["--data", "coco"], "--data")]:
        with pytest.raises(UserError, match="ckpt.pth: saved with " + re.escape(needle)):
            check_resume_args("ckpt.pth", saved, mscl.get_args(base + flags), *resume)


def test_resume_refuses_a_checkpoint_that_no_longer_fits(tmp_path):
    """A checkpoint saved before a setting existed (its args lack the key, so the settings check
    lets it through) whose tensors do not fit the model is refused with one line: other shapes
    (pool-conv's 1x1 Conv2 under conv-pool) or a tensor missing."""
    from common.utils import resume_pretraining, rng_state
    flags = ["--backbone", "resnet18", "--epochs", "2", "--out", str(tmp_path)]
    args = mscl.get_args(flags + ["--resume", str(tmp_path / "old.pth")])
    model = mscl.build_model(args)
    optimizer, scaler = mscl.build_optimizer(model, 0.1, args), torch.amp.GradScaler(enabled=False)
    saved = {k: v for k, v in vars(args).items() if k != "fusion"}

    def resume_from(state):
        torch.save({"model": state, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": 1, "iteration": 2, "args": saved,
                    "rng": [rng_state()]}, tmp_path / "old.pth")
        return resume_pretraining(args, mscl.RESUME_KEYS, 4, ("fpn",),
                                  model=mscl.build_model(args), optimizer=optimizer, scaler=scaler)
    assert resume_from(model.state_dict()) == (1, 2, [])  # a checkpoint that fits loads
    pool_conv = mscl.build_model(mscl.get_args(flags + ["--fusion", "pool-conv"])).state_dict()
    missing = {k: v for k, v in model.state_dict().items() if k != "neck.conv2.3.bias"}
    for state, named in ((pool_conv, "neck.conv2.0.weight: expected (512, 256, 3, 3), found "
                                      "(512, 256, 1, 1); 4 tensors differ"),
                         (missing, "neck.conv2.3.bias: expected (512,), found nothing")):
        with pytest.raises(UserError, match=r"old\.pth: the model does not fit this run") as e:
            resume_from(state)
        assert len(str(e.value).splitlines()) == 1 and f"({named})" in str(e.value)


# ----------------------------------------------------------------------------------------------
#   script

def test_run_writes_outputs_and_export_loads_into_torchvision_and_mrpose(images, tmp_path):
    _, flags = images
    out = tmp_path / "run"
    p = run(flags + SMALL + ["--epochs", "2", "--out", out])
    assert "= 0.0015625" in p.stdout  # effective lr = base 0.05 x 8 / 256 is printed
    for name in ["checkpoint.pth", "backbone.pth", "log.jsonl", "loss.png"]:
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".tmp-*"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and log[-1]["iteration"] == 4
    assert set(log[-1]["loss_scales"]) == set(log[-1]["z_std"]) == {"F1", "F2", "F3", "F4"}
    assert log[-1]["loss"] == pytest.approx(sum(w * log[-1]["loss_scales"][n] for w, n in
                                                zip([0.1, 0.2, 0.2, 0.5],
                                                    ["F1", "F2", "F3", "F4"])), abs=1e-5)
    assert all(v > 0.2 / 512 ** 0.5 for v in log[-1]["z_std"].values())
    assert log[-1]["pairs_per_s"] > 0 and log[-1]["lr"] > 0
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "iteration", "args", "rng"} <= set(ckpt)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # the export: torchvision's resnet misses exactly fc.*; mrpose loads every backbone tensor
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out / "backbone.pth", weights_only=True),
                                              strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.layer4[1].conv2.weight, ckpt["model"]["backbone.layer4.1.conv2.weight"])
    args = mrpose.get_args(["--data", "coco", "--backbone", "resnet18", "--pretrained",
                            str(out / "backbone.pth")])
    model, report = mrpose.build_model(args)
    n = len(list(model.backbone.parameters()))
    assert f"loaded {n}/{n} backbone parameters" in report and "missing" not in report
    assert torch.equal(model.backbone.layer1[0].conv1.weight,
                       ckpt["model"]["backbone.layer1.0.conv1.weight"])


def test_resume_continues_exactly(images, tmp_path):
    _, flags = images
    common = flags + SMALL + ["--epochs", "2"]  # 16 images / batch 8: 2 iterations per epoch
    run(common + ["--out", tmp_path / "straight"])
    # stops after epoch 1 of the same schedule
    run(common + ["--iters", "2", "--out", tmp_path / "resumed"])
    run(common + ["--resume", "--out", tmp_path / "resumed"])
    p = run(common + ["--resume", "--fusion", "pool-conv", "--out", tmp_path / "resumed"], expect=2)
    assert_one_line_error(p, "checkpoint.pth", "saved with --fusion conv-pool, this run has "
                                               "pool-conv")
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4 and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert ([g["lr"]
             for g in a["optimizer"]["param_groups"]] == [g["lr"]
                                                          for g in b["optimizer"]["param_groups"]])
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("straight", "resumed")]
    assert ([(e["epoch"], e["loss"], e["lr"])
             for e in logs[0]] == [(e["epoch"], e["loss"], e["lr"]) for e in logs[1]])


def rank_batch(args, files, rank, world):
    """Rank `rank`'s first batch and initial model, drawn as mscl.main draws them (seed + rank, the
    model, the sampler's share, the loader's base seed, then the views, in one process with
    --workers 0)."""
    seed_everything(args.seed + rank)
    model = mscl.build_model(args)
    per_rank, _, _ = mscl.batch_and_lr(args, world)
    ds = mscl.TwoViews(files, mscl.moco_v2_augmentation(args.crop_size))
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=0,
                                         drop_last=True)
    return model, next(iter(loader))


def test_torchrun_two_ranks_average_gradients_of_different_samples(images, tmp_path):
    """One step of 2-rank DDP equals one process that runs each rank's half batch through rank 0's
    model and steps with the mean of the two gradients: fails if the gradients were not averaged
    (each rank would step with its own) or if both ranks drew the same samples (the mean would be
    one half's gradient)."""
    folder, flags = images
    out = tmp_path / "ddp"
    # batch 7 on 2 ranks: 3 per rank, 6 in all, and the lr follows the 6
    p = run(flags + SMALL + ["--batch-size", "7", "--iters", "1", "--epochs", "3", "--out", out],
            torchrun=True)
    assert ("lr 0.05 x 6/256 = 0.0011719 (--batch-size 7 rounded down to 3 x 2 ranks)"
            in p.stdout), p.stdout
    digests = dict(re.findall(r"rank (\d)/2: parameters sha1 ([0-9a-f]{40})", p.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], p.stdout
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 1 and len(ckpt["rng"]) == 2

    args = mscl.get_args(flags + SMALL + ["--batch-size", "7", "--epochs", "3"])
    files = list_images(str(folder))
    model, halves = None, []
    for rank in range(2):
        m, batch = rank_batch(args, files, rank, 2)
        model = model or m  # DDP starts every rank from rank 0's parameters
        halves.append(batch)
    assert not torch.equal(halves[0][0], halves[1][0])
    init = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for x1, x2 in halves:
        model.load_state_dict(init)  # each rank's BatchNorm sees its own half
        model.zero_grad()
        mscl.mscl_loss(*model(x1, x2), mscl.scale_weights(args))[0].backward()
        grads.append([None if q.grad is None else q.grad.clone() for q in model.parameters()])
    model.load_state_dict(init)
    optimizer = mscl.build_optimizer(model, mscl.batch_and_lr(args, 2)[2], args)
    for q, g0, g1 in zip(model.parameters(), *grads):
        q.grad = None if g0 is None else (g0 + g1) / 2
    optimizer.step()
    moved = 0
    for name, q in model.named_parameters():
        step, expect = ckpt["model"][name] - init[name], q.detach() - init[name]
        # the ranks run one thread each, this process two: sums differ in their last bits, and a
        # step is read back as a difference of parameters (a BatchNorm weight of 1 holds steps to
        # its float32 spacing)
        tol = (1e-3 * expect.abs().max().item() + 2 * torch.finfo(torch.float32).eps
               * init[name].abs().max().item())
        torch.testing.assert_close(step, expect, rtol=1e-3, atol=tol, msg=name)
        moved += bool(expect.abs().sum() > 0)
    assert moved > 100


def test_bad_inputs_and_nonfinite_loss(images, tmp_path):
    folder, flags = images
    p = run(["--data", "imagenet", "--data-root", tmp_path / "nowhere", "--out", tmp_path / "o"],
            expect=2)
    assert_one_line_error(p, tmp_path / "nowhere", "not found")
    p = run(["--data", "imagenet", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, "/data/imagenet: data root not found (--data-root)")
    p = run(["--data", "folder", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, "--images")
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run(["--data", "folder", "--images", empty, "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, empty, "no images")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in sorted(folder.iterdir())[:7]:
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # 8 images, batch 8: it is read
    p = run(["--data", "folder", "--images", bad] + SMALL + ["--epochs", "1", "--out",
                                                             tmp_path / "o"], expect=2)
    assert_one_line_error(p, "broken.jpg", "unreadable image")
    # a non-finite loss stops the run with a message and keeps the last good checkpoint
    out = tmp_path / "run"
    run(flags + SMALL + ["--epochs", "1", "--out", out])
    before = (out / "checkpoint.pth").read_bytes()
    p = run(flags + SMALL + ["--epochs", "1", "--lr", "1e38", "--out", out], expect=2)
    assert "non-finite loss" in p.stderr and "Traceback" not in p.stderr
    assert (out / "checkpoint.pth").read_bytes() == before
