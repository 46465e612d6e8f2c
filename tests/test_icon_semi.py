"""icon.py --semi (ICON Table 4, Eq. (7)): the step is common/semi.py's loss plus λp x each trained
network's own ICON contrast on its labeled crops; gradients reach no teacher; one run writes, saves
and resumes."""
import json

import numpy as np
import pytest
import torch

import icon
from common.semi import PairedDataset, build_unlabeled
from common.topdown import build_data
from common.utils import save_checkpoint
from data.demo import make_demo
from helpers import assert_one_line_error, run_script

CPU = torch.device("cpu")
SMALL = ["--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers",
         "0", "--print-freq", "1", "--no-flip-test", "--head-channels", "32", "--embed-dim", "32",
         "--num-queries", "16", "--num-negatives", "32", "--labeled", "8", "--lr-steps", "9",
         "--pretrained", "none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=24, n_val=8)
    return ["--data", "coco", "--ann", f"{root}/annotations/person_keypoints_train2017.json",
            "--images", f"{root}/train2017", "--val-ann",
            f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
            f"{root}/val2017"] + SMALL


def setup(argv):
    """What icon.main builds for --semi: args, icon.build_networks' (pose networks, projection
    heads, trained module, common/semi.py's wrapper) and one (labeled, unlabeled) batch of 8
    pairs."""
    torch.manual_seed(0)
    args = icon.get_args(argv)
    poses, heads, trained, semi = icon.build_networks(args, CPU)
    trained.train()
    train, _, info = build_data(args, train=True)
    paired = PairedDataset(train, build_unlabeled(args, train, info))
    return (args, (poses, heads, trained, semi),
            torch.utils.data.default_collate([paired[i] for i in range(8)]))


def step(nets, batch, args):
    poses, heads, trained, semi = nets
    return icon.train_step(trained, semi, batch, args, CPU, np.random.default_rng(0))


def test_dual_step_is_the_dual_loss_plus_each_networks_contrast_on_labeled_crops(tiny):
    args, nets, batch = setup(tiny + ["--semi", "dual", "--contrast-crops", "labeled"])
    poses, heads, trained, semi = nets
    assert trained.net is semi and [n.pose for n in semi.nets] == poses
    assert len(heads) == 2 and heads[0] is not heads[1]  # each network its own projection head
    torch.manual_seed(5)
    loss, terms = step(nets, batch, args)
    # the same draws: supervised ICON's step (Eq. (5)) of each network on the labeled crops
    torch.manual_seed(5)
    ref = [icon.train_step(icon.ICON(icon.Tapped(f), [g]), None, batch["labeled"], args, CPU,
                           None)[1] for f, g in zip(poses, heads)]
    for i, r in enumerate(ref, 1):
        assert torch.allclose(terms[f"sup{i}"], r["mse"])
        assert (torch.equal(terms[f"skcc{i}"], r["skcc"])
                and torch.equal(terms[f"prcc{i}"], r["prcc"]))
    # mrpose.py's --semi dual loss
    dual = 0.5 * (ref[0]["mse"] + ref[1]["mse"]) + terms["cons1"] + terms["cons2"]
    ctr = sum(0.3 * r["skcc"] + 0.7 * r["prcc"] for r in ref)
    assert ctr > 1 and torch.allclose(loss.detach(), dual + args.lambda_p * ctr)  # Eq. (7), λp = 1
    # --lambda-p 0: no projection head, and the step is common/semi.py's dual loss alone
    args0, nets0, batch0 = setup(tiny + ["--semi", "dual", "--lambda-p", "0"])
    assert nets0[1] == [] and nets0[2] is nets0[3] and nets0[3].nets[1] is nets0[0][1]
    loss0, terms0 = step(nets0, batch0, args0)
    assert torch.allclose(loss0,
                          0.5 * (terms0["sup1"] + terms0["sup2"]) + terms0["cons1"]
                          + terms0["cons2"])
    assert not any(k.startswith(("skcc", "prcc")) for k in terms0)


def test_hard_rot_factor_rotates_the_hard_view_alone(tiny):
    """--hard-rot-factor reaches --semi dual's hard view (p 0.8); by default it is --rot-factor."""
    def rotations(flags):
        args = icon.get_args(tiny + ["--semi", "dual"] + flags)
        semi = icon.build_networks(args, CPU)[3]
        theta = semi.draw_view(np.random.default_rng(0), 4000)["theta"]
        return args, torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))

    def assert_rotated(r, rf):
        assert abs((r.abs() > 1e-6).float().mean() - 0.8) < 0.03 and r.abs().max() <= 2 * rf + 1e-4
        assert abs(r[r.abs() > 1e-6].abs().median() - rf * 0.6745) < 1.5  # the median of |N(0, rf)|

    args, r = rotations(["--rot-factor", "0"])
    assert args.hard_rot_factor is None and r.abs().max() == 0
    args, r = rotations(["--rot-factor", "0", "--hard-rot-factor", "30"])
    assert args.rot_factor == 0  # the easy view (the dataset's augmentation) stays unrotated
    assert_rotated(r, 30)
    assert_rotated(rotations(["--rot-factor", "30"])[1], 30)


@pytest.mark.parametrize("mode", ["dual", "pseudo"])
def test_unlabeled_crops_join_the_contrast_at_confident_pseudo_joints(tiny, tmp_path, monkeypatch,
                                                                      mode):
    """--contrast-crops all (the default): each network's contrast pool is its labeled crops plus
    its unlabeled crops with gradient (dual: its hard view; pseudo: the student's crop), whose
    joints are the integer argmax of the map that supervises them, usable where its peak is >= 0.75;
    --contrast-crops labeled: labeled only."""
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(teacher, {"model": icon.build_model(icon.get_args(tiny))[0].state_dict()})
    argv = tiny + ["--semi", mode] + (["--teacher", str(teacher)] if mode == "pseudo" else [])
    args, nets, batch = setup(argv)
    poses, heads, trained, semi = nets
    pools, outs = [], []
    monkeypatch.setattr(icon, "icon_contrast", lambda *a,
                        **kw: (pools.append((a, kw)), (a[1].sum() * 0, {}))[1])
    forward = semi.forward

    def confident(*a):  # every supervising map peaks at 1 on joints 0-7 and at 0.5 on the others
        out = forward(*a)
        for t in out["targets"]:
            t.mul_(0.1)
            t[:, :8, 3, 2] = 1.0
            t[:, 8:, 5, 1] = 0.5
        outs.append(out)
        return out
    monkeypatch.setattr(semi, "forward", confident)
    step(nets, batch, args)
    assert len(pools) == len(semi.nets)
    for i, (a, kw) in enumerate(pools):
        heatmaps, emb, joints, target, usable = a
        out = outs[0]
        # 8 labeled + 8 unlabeled persons in one pool
        assert heatmaps.shape[0] == emb.shape[0] == 16
        assert (torch.equal(emb[8:], out["cons"][i][1])
                and torch.equal(heatmaps[8:], out["cons"][i][0].float()))
        assert torch.equal(target[8:], out["targets"][i])  # hardness uses the pseudo target
        assert (joints[8:, :8] == torch.tensor([2.0, 3.0]) * 4).all()  # heatmap (2, 3) at stride 4
        assert (usable[8:, :8].all() and not usable[8:, 8:].any()
                and torch.equal(kw["claim"][8:], usable[8:]))
        assert (torch.equal(emb[:8], out["sup"][i][1])
                and torch.equal(joints[:8], batch["labeled"]["joints"]))
        assert torch.equal(kw["person"],
                           torch.cat([batch["labeled"]["pid"], batch["unlabeled"]["pid"]]))
    if mode == "dual":  # network i's hard view, through network i's own head
        assert torch.equal(outs[0]["cons"][1][1],
                           heads[1](icon.Tapped(poses[1])(outs[0]["hard"][1])[1]))
    pools.clear()
    args, nets, batch = setup(argv + ["--contrast-crops", "labeled"])
    step(nets, batch, args)
    assert all(a[1].shape[0] == 8 for a, _ in pools)


def test_person_ids_follow_the_person_across_labeled_and_unlabeled_items(tiny):
    """pid: a training person's index, the same on its labeled and unlabeled items (--unlabeled
    all), disjoint between the labeled persons and the rest (--unlabeled rest)."""
    args = icon.get_args(tiny + ["--semi", "dual", "--unlabeled", "all"])
    train, _, info = build_data(args, train=True)
    unlabeled = build_unlabeled(args, train, info)
    n = len(train)
    assert [int(train[i]["pid"]) for i in range(n)] == list(range(n))
    assert ([int(unlabeled[i]["pid"])
             for i in range(len(unlabeled))] == list(range(n + len(info["unlabeled"]))))
    assert unlabeled[0]["pid"].dtype == torch.int64
    args = icon.get_args(tiny + ["--semi", "dual", "--unlabeled", "rest"])
    rest = build_unlabeled(args, *build_data(args, train=True)[::2])
    assert [int(rest[i]["pid"]) for i in range(len(rest))] == list(range(n, n + len(rest)))


def test_gradient_routing(tiny, tmp_path):
    # dual: network 1's contrast reaches network 1 and its head only
    args, (poses, heads, trained, semi), batch = setup(tiny + ["--semi", "dual"])
    labeled = batch["labeled"]
    x = icon.normalize(labeled["image"])
    out = trained(x, icon.normalize(batch["unlabeled"]["image"]),
                  semi.draw_view(np.random.default_rng(0), 8))
    target, weight = icon.gaussian_targets(labeled["joints"], labeled["visible"], args.input_size,
                                           args.heatmap_size)
    usable = (labeled["vis_flag"] >= icon.visible_flags(args)) & (weight > 0)
    ctr, _ = icon.icon_contrast(*out["sup"][0], labeled["joints"], target, usable,
                                claim=weight > 0, input_size=args.input_size,
                                pairs=icon.LIMB_PAIRS["coco"])
    ctr.backward()
    assert all(p.grad is None or not p.grad.any()
               for p in list(poses[1].parameters()) + list(heads[1].parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads[0].parameters())
    # the contrast taps C4: layer3 and below learn from it, layer4 does not
    backbone = poses[0].backbone
    assert backbone.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in backbone.layer4.parameters())
    # pseudo: the frozen teacher gets nothing from Eq. (7); the student and its head learn
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(teacher, {"model": icon.build_model(icon.get_args(tiny))[0].state_dict()})
    args, nets, batch = setup(tiny + ["--semi", "pseudo", "--teacher", str(teacher)])
    poses, heads, trained, semi = nets
    loss, terms = step(nets, batch, args)
    loss.backward()
    assert ({"sup1", "cons1", "skcc1", "prcc1", "pseudo_kept"} <= set(terms)
            and len(heads) == 1)
    assert all(p.grad is None for p in semi.teacher.parameters()) and not semi.teacher.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads[0].parameters())


def test_semi_run_saves_the_pose_network_alone_and_resumes(tiny, tmp_path):
    out = tmp_path / "dual"
    # 27 pairs: one iteration per epoch
    flags = tiny + ["--semi", "dual", "--batch-size", "16", "--out", out]
    run_script("icon.py", flags + ["--iters", "1"])
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert ({"sup1", "sup2", "cons1", "cons2", "skcc1", "prcc2", "peak2", "metrics_net2",
             "metrics_ensemble"} <= set(log))
    assert all(np.isfinite(log[k]) for k in ("loss", "skcc1", "skcc2"))
    run_script("-m", ["eval.icon_embeddings", "--checkpoint", out / "best.pth"])
    assert np.isfinite(json.loads((out / "embeddings.json").read_text())["embed_sep"])
    pose = icon.build_model(icon.get_args(tiny))[0]
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"]
    # the inference model: network 1 alone, no head, no network 2
    assert set(best) == set(pose.state_dict())
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (ckpt["model2"].keys() == ckpt["model"].keys()
            and ckpt["proj2"].keys() == ckpt["proj"].keys())
    assert any(not torch.equal(v, ckpt["proj2"][k]) for k, v in ckpt["proj"].items()
               if v.is_floating_point())
    run_script("icon.py", flags + ["--iters", "2", "--resume"])
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["iteration"] == 2
    # 16 persons fit batch 16
    supervised = [f for f in flags if f not in ("--semi", "dual")] + ["--labeled", "16"]
    p = run_script("icon.py", supervised + ["--iters", "3", "--resume"], expect=2)
    assert_one_line_error(p, "--semi dual")
    # Pseudo + ICON with the dual run's network 1 as the teacher
    run_script("icon.py", tiny + ["--semi", "pseudo", "--teacher", out / "best.pth", "--iters", "1",
                                  "--out", tmp_path / "p"])
    log = json.loads((tmp_path / "p" / "log.jsonl").read_text().splitlines()[-1])
    assert {"sup1", "cons1", "skcc1", "pseudo_kept"} <= set(log) and "sup2" not in log
    saved = tmp_path / "p" / "checkpoint.pth"
    assert "model2" not in torch.load(saved, map_location="cpu", weights_only=True)
