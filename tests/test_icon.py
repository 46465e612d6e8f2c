"""icon.py: Eq. (1) against its definition, the contrast's behaviour, sampling counts, masks, visibility,
the HRNet tap, the saved inference model, one run alone and under torchrun, bad input."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import icon
import mrpose
from common.datasets import COCO_FLIP_PAIRS, TopDownDataset
from common.topdown import build_data, evaluate, load_weights
from common.utils import UserError
from data.demo import make_demo
from helpers import SHARED, assert_one_line_error, run_script

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
SMALL = ["--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers", "0",
         "--print-freq", "1", "--no-flip-test", "--head-channels", "32", "--embed-dim", "32"]


def contrast_args(sampling="all", contrast="inter", nq=16, nn=32):
    return SimpleNamespace(sampling=sampling, contrast=contrast, hard_q=[5, 8], hard_h=[6, 4], num_queries=nq,
                           num_negatives=nn, tau=0.07)


def random_batch(b=4, c=6, o=5, m=8, seed=0, p_valid=0.8):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(b, c, o, m, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.rand(b, c, o, generator=g) < p_valid
    return feats, valid


def test_eq1_matches_a_naive_per_query_loop():
    """contrast_term (inter, all classes) = Eq. (1) computed query by query from its definition on the same draw."""
    feats, valid = random_batch()
    b, c, o, m = feats.shape
    args = contrast_args()
    torch.manual_seed(3)
    loss, n_classes = icon.contrast_term(feats, valid, None, "skcc", args)
    torch.manual_seed(3)  # the same draw: "all" picks classes without randomness, then sample_contrast draws
    count = valid.sum(-1)
    qc, neg_classes = icon.choose_classes("all", None, None, (count > 0).sum(0) >= 2, (count > 0).any(0), 0, 0, None)
    s = icon.sample_contrast(valid, qc, neg_classes, args.num_queries, args.num_negatives, False)
    pool = feats.transpose(0, 1).reshape(c * b * o, m)  # class-major: entry = (class, instance, pixel)
    entry = [(k, n, p) for k in range(c) for n in range(b) for p in range(o)]
    per_class = []
    for a, k in enumerate(qc.tolist()):
        negs = [pool[e] for e in s["neg_index"][a].tolist()]
        assert all(entry[e][0] != k and valid[entry[e][1], entry[e][0], entry[e][2]] for e in s["neg_index"][a])
        losses = []
        for j in s["qi"][a].tolist():
            inst = j // o
            assert valid[inst, k, j % o]  # queries are labeled, visible pixels of the class
            qv = pool[k * b * o + j]
            positives = [pool[k * b * o + n * o + p] for n in range(b) for p in range(o) if n != inst and valid[n, k, p]]
            if not positives:
                continue
            neg_sum = sum(math.exp(float(qv @ v) / args.tau) for v in negs)
            terms = [-math.log(math.exp(float(qv @ v) / args.tau) / (math.exp(float(qv @ v) / args.tau) + neg_sum))
                     for v in positives]
            losses.append(sum(terms) / len(terms))
        if losses:
            per_class.append(sum(losses) / len(losses))
    assert n_classes == len(per_class) > 1
    assert loss.item() == pytest.approx(sum(per_class) / len(per_class), rel=1e-9)


def test_intra_image_loss_matches_the_definition_too():
    """Masked negatives (intra): same per-query definition, negatives = other classes of the query's instance."""
    feats, valid = random_batch(seed=1)
    b, c, o, m = feats.shape
    args = contrast_args(contrast="intra")
    torch.manual_seed(0)
    loss, _ = icon.contrast_term(feats, valid, None, "skcc", args)
    torch.manual_seed(0)
    count = valid.sum(-1)
    qc, neg_classes = icon.choose_classes("all", None, None, (count >= 2).any(0), (count > 0).any(0), 0, 0, None)
    s = icon.sample_contrast(valid, qc, neg_classes, args.num_queries, args.num_negatives, True)
    per_class = []
    for a, k in enumerate(qc.tolist()):
        losses = []
        for j in s["qi"][a].tolist():
            n, p0 = divmod(j, o)
            qv = feats[n, k, p0]
            pos = [feats[n, k, p] for p in range(o) if p != p0 and valid[n, k, p]]
            neg = [feats[n, k2, p] for k2 in range(c) if k2 != k for p in range(o) if valid[n, k2, p]]
            if pos and neg:
                ns = sum(math.exp(float(qv @ v) / args.tau) for v in neg)
                losses.append(np.mean([-math.log(math.exp(float(qv @ v) / args.tau)
                                                 / (math.exp(float(qv @ v) / args.tau) + ns)) for v in pos]))
        if losses:
            per_class.append(np.mean(losses))
    assert loss.item() == pytest.approx(float(np.mean(per_class)), rel=1e-9)


def test_loss_falls_when_a_class_coincides_and_rises_when_classes_swap():
    b, c, o, m = 6, 8, 5, 16
    centres = F.normalize(torch.randn(c, m, generator=torch.Generator().manual_seed(0)), dim=-1)
    valid = torch.ones(b, c, o, dtype=torch.bool)
    noise = torch.randn(b, c, o, m, generator=torch.Generator().manual_seed(1))
    scattered = F.normalize(noise, dim=-1)
    together = F.normalize(centres[None, :, None] + 0.05 * noise, dim=-1)
    swapped = together.clone()
    swapped[::2] = swapped[::2, torch.arange(c).roll(1)]  # half of the people carry the next class's embeddings
    losses = []
    for feats in (scattered, together, swapped):
        torch.manual_seed(0)
        losses.append(icon.contrast_term(feats, valid, None, "skcc", contrast_args())[0].item())
    scattered_l, together_l, swapped_l = losses
    assert together_l < 0.1 * scattered_l
    assert swapped_l > 10 * together_l


def test_hard_random_all_pick_the_stated_class_counts():
    c = 17
    g = torch.Generator().manual_seed(0)
    hardness = torch.rand(c, generator=g)
    proto = F.normalize(torch.randn(c, 8, generator=g), dim=-1)
    eligible = torch.ones(c, dtype=torch.bool)
    eligible[[2, 9]] = False  # e.g. seen in one instance only: no positive
    present = torch.ones(c, dtype=torch.bool)
    present[9] = False
    hardness[2] = 10.0  # the hardest class, but not eligible
    qc, neg = icon.choose_classes("hard", hardness, proto, eligible, present, 5, 6, None)
    expected = hardness.masked_fill(~eligible, -1).topk(5).indices
    assert sorted(qc.tolist()) == sorted(expected.tolist())
    assert (neg.sum(-1) == 6).all() and not neg[:, 9].any()
    for a, k in enumerate(qc.tolist()):  # the 6 present other classes with the most similar prototypes
        sim = (proto @ proto[k]).masked_fill(~present, -2)
        sim[k] = -2
        assert set(neg[a].nonzero()[:, 0].tolist()) == set(sim.topk(6).indices.tolist())
    qc, neg = icon.choose_classes("hard", hardness[:8], proto[:8], eligible[:8], present[:8], 8, 4, None)  # PRCC
    assert len(qc) == 7 and (neg.sum(-1) == 4).all()  # 8 pairs, one not eligible
    qc, neg = icon.choose_classes("all", None, proto, eligible, present, 5, 6, None)
    assert len(qc) == 15 and (neg.sum(-1) == 15).all()  # every eligible class against every other present one
    counts = icon.RANDOM_COUNTS["skcc"]
    for seed in range(5):
        torch.manual_seed(seed)
        qc, neg = icon.choose_classes("random", None, proto, eligible, present, 5, 6, counts)
        assert counts["queries"][0] <= len(qc) <= counts["queries"][1] and len(set(qc.tolist())) == len(qc)
        n = neg.sum(-1)
        assert ((n >= counts["negatives"][0]) & (n <= counts["negatives"][1])).all() and eligible[qc].all()


@pytest.mark.parametrize("contrast", ["inter", "intra"])
def test_positive_and_negative_masks_respect_instances(contrast):
    feats, valid = random_batch(b=5, c=6, o=4, seed=2)
    b, c, o, _ = feats.shape
    count = valid.sum(-1)
    intra = contrast == "intra"
    eligible = (count >= 2).any(0) if intra else (count > 0).sum(0) >= 2
    qc, neg_classes = icon.choose_classes("all", None, None, eligible, (count > 0).any(0), 0, 0, None)
    s = icon.sample_contrast(valid, qc, neg_classes, 64, 128, intra)
    inst = torch.arange(b).repeat_interleave(o)
    q_inst = inst[s["qi"]]
    same = q_inst[..., None] == inst
    assert s["pos_mask"].any()
    if intra:  # never another person: positives of the query's own joint, negatives of its own instance
        assert not (s["pos_mask"] & ~same).any()
        assert not (s["neg_mask"] & ~(q_inst[..., None] == inst.repeat(c))).any()
        assert not (s["pos_mask"] & (s["qi"][..., None] == torch.arange(b * o))).any()  # not itself
    else:
        assert not (s["pos_mask"] & same).any()


def test_only_labeled_visible_joints_enter_the_contrast():
    """The contrast has no gradient at joints flagged occluded (1) or unlabeled (0), and has one at visible joints."""
    joints = np.array([[10, 10], [30, 30], [50, 50], [20, 60], [40, 15]], np.float32)
    flags = np.array([2, 1, 0, 2, 2], np.float32)
    b, m, w, h = 3, 8, 16, 24
    emb = F.normalize(torch.randn(b, m, h, w), dim=1).requires_grad_()
    jt = torch.tensor(joints)[None].repeat(b, 1, 1)
    usable = torch.tensor(flags)[None].repeat(b, 1) >= 2
    offsets = icon.region_offsets(2.0, 0.5)
    feats, valid = icon.keypoint_embeddings(emb, jt, usable, (64, 96), offsets)
    assert not valid[:, [1, 2]].any() and valid[:, [0, 3, 4]].all()
    torch.manual_seed(0)
    loss, _ = icon.contrast_term(feats, valid, None, "skcc", contrast_args())
    loss.backward()
    grad = emb.grad.abs().sum((0, 1))  # (h, w)
    for j, flag in enumerate(flags):
        x, y = (joints[j] / 4 + 0.5).astype(int)
        assert (grad[y, x] > 0) == (flag == 2), (j, flag)


def test_hrnet_tap_and_head_shapes():
    args = icon.get_args(["--data", "coco", "--backbone", "hrnet_w32", "--input-size", "48", "64", "--embed-dim", "16"])
    pose, head, _ = icon.build_model(args)
    assert sum(p.numel() for p in pose.parameters()) == 28_536_113  # the official W32, 17 joints: no head inside
    heat, tap = icon.forward_tapped(pose.eval(), torch.zeros(1, 3, 64, 48))
    assert heat.shape == (1, 17, 16, 12) and tap.shape == (1, 32 + 64 + 128, 16, 12)
    z = head.eval()(tap)
    assert z.shape == (1, 16, 16, 12) and torch.allclose(z.norm(dim=1), torch.ones(1, 16, 12), atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=24, n_val=8)
    return ["--data", "coco", "--ann", f"{root}/annotations/person_keypoints_train2017.json",
            "--images", f"{root}/train2017", "--val-ann", f"{root}/annotations/person_keypoints_val2017.json",
            "--val-images", f"{root}/val2017"]


def test_raw_visibility_flag_reaches_the_batch(tiny):
    from common.datasets import load_coco, read_coco
    ann, images = tiny[tiny.index("--val-ann") + 1], tiny[tiny.index("--val-images") + 1]
    coco = load_coco(ann)
    records, _ = read_coco(coco, images, 0.75)
    raw = {a["id"]: np.array(a["keypoints"][2::3]) for a in coco.dataset["annotations"]}
    flags = [r["vis_flag"] for r in records]
    assert any((f == 1).any() for f in flags) and any((f == 2).any() for f in flags)  # the demo has both
    assert all(any(np.array_equal(f, v) for v in raw.values()) for f in flags)
    item = TopDownDataset(records, (64, 96), COCO_FLIP_PAIRS, [])[0]
    assert torch.equal(item["vis_flag"], torch.tensor(flags[0], dtype=torch.float32))


def test_all_three_terms_fall_on_a_real_batch(tiny):
    """A few Adam steps of Eq. (5) on one batch of demo images lower the MSE, SKCC and PRCC terms together."""
    torch.manual_seed(0)
    args = icon.get_args(tiny + SMALL + ["--num-queries", "64", "--num-negatives", "128"])
    pose, head, _ = icon.build_model(args)
    model = icon.ICON(pose, head).train()
    train, _, _ = build_data(args, train=True)
    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        torch.manual_seed(1)  # the same draw of queries and negatives each step
        loss, terms = icon.icon_losses(model, batch, args, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(terms)
    for k in ("mse", "skcc", "prcc"):
        assert history[-1][k] < 0.8 * history[0][k], (k, [float(h[k]) for h in history])


def test_run_writes_outputs_and_saves_the_pose_network_alone(tiny, tmp_path):
    out = tmp_path / "icon"
    p = run_script("icon.py", tiny + SMALL + ["--iters", "2", "--lr-steps", "9", "--num-queries", "32",
                                              "--num-negatives", "64", "--out", out])
    assert "embeddings (tapped features, val): same-class cosine" in p.stdout
    for name in ["checkpoint.pth", "best.pth", "log.jsonl", "metrics.json",
                 "person_keypoints_val2017_icon_results.json", "predictions.png", "embeddings.png"]:
        assert (out / name).stat().st_size > 0, name
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(log[k]) for k in ("loss", "mse", "skcc", "prcc", "embed_same", "embed_other"))
    assert log["loss"] > log["mse"] and "AP" in log["metrics"]
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"]
    args = icon.get_args(tiny + SMALL)
    pose, head, _ = icon.build_model(args)
    assert set(best) == set(pose.state_dict())  # the baseline's tensors, none of the projection head's
    assert not any(k in best for k in ("head.net.0.weight", "net.0.weight"))
    assert "proj" in torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)  # kept to resume
    # the inference model is a SimpleBaseline checkpoint: what `mrpose.py --eval-only --weights` builds and loads
    mr_args = mrpose.get_args(tiny + ["--backbone", "resnet18", "--head-channels", "32", "--pretrained", "none"])
    mr_model, _ = mrpose.build_model(mr_args)
    load_weights(mr_model, out / "best.pth")
    x = torch.randn(2, 3, 96, 64)
    pose.load_state_dict(best)
    assert torch.equal(mr_model.eval()(x), pose.eval()(x))


def test_torchrun_two_ranks(tiny, tmp_path):
    out = tmp_path / "ddp"
    p = run_script("icon.py", tiny + SMALL + ["--iters", "2", "--lr-steps", "9", "--num-queries", "16",
                                              "--num-negatives", "32", "--out", out], torchrun=True)
    assert "on 2 x cpu" in p.stdout and (out / "best.pth").exists()
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert log["iteration"] == 2 and np.isfinite(log["skcc"]) and np.isfinite(log["prcc"])


def test_bad_inputs_give_one_line_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="torchvision has no HRNet"):
        icon.get_args(["--data", "coco", "--backbone", "hrnet_w32", "--pretrained", "torchvision"])
    p = run_script("icon.py", ["--tau", "0"], expect=2)  # as the user sees it: one line, exit 2
    assert_one_line_error(p, "--tau", "positive")
    junk = tmp_path / "w.pth"
    torch.save({"model": {"final_layer.weight": torch.zeros(3)}}, junk)
    pose, _, _ = icon.build_model(icon.get_args(tiny + SMALL))
    with pytest.raises(UserError, match="does not fit"):
        load_weights(pose, junk)
    no_index = tmp_path / "crowd.json"  # a CrowdPose json without crowdIndex
    no_index.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [],
                                    "categories": [{"id": 1, "name": "person"}]}))
    args = icon.get_args(["--data", "crowdpose", "--val-ann", str(no_index), "--val-images", str(tmp_path)])
    with pytest.raises(UserError, match="crowdIndex") as e:
        build_data(args, train=False)
    assert str(no_index) in str(e.value) and "\n" not in str(e.value)  # run_main prints it as one line


@needs_shared
def test_crowdpose_oracle_through_the_pipeline():
    """--data crowdpose reads the official json and scores with crowdposetools' metric: the ground truth through
    the heatmap path scores near 1 (quantisation only)."""
    root = SHARED / "crowdpose"
    args = icon.get_args(["--data", "crowdpose", "--val-ann", str(root / "annotations" / "test_crowdpose.json"),
                          "--val-images", str(root / "images"), "--workers", "0"])
    _, val, info = build_data(args, train=False)
    metrics, results, _ = evaluate(torch.nn.Identity(), val, args, torch.device("cpu"), info, oracle=True)
    assert set(metrics) >= {"AP", "AP_easy", "AP_medium", "AP_hard"} and metrics["AP"] > 0.9, metrics
    assert len(results[0]["keypoints"]) == 42
