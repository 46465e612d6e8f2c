"""icon.py: Eq. (1) against its definition, the contrast's behaviour, sampling counts, masks,
visibility, the HRNet tap, the saved inference model, one run alone and under torchrun, bad
input."""
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
SMALL = ["--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers",
         "0", "--print-freq", "1", "--no-flip-test", "--head-channels", "32", "--embed-dim", "32",
         "--pretrained", "none"]


def contrast_args(sampling="all", contrast="inter", nq=16, nn=32):
    """contrast_term's keyword arguments, as a user lifting the block passes them (SKCC's
    counts)."""
    return dict(sampling=sampling, intra=contrast == "intra", num_query_classes=5,
                num_negative_classes=6, random_counts=icon.RANDOM_COUNTS["skcc"], num_queries=nq,
                num_negatives=nn, tau=0.07)


def random_batch(b=4, c=6, o=5, m=8, seed=0, p_valid=0.8):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(b, c, o, m, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.rand(b, c, o, generator=g) < p_valid
    return feats, valid


def test_eq1_matches_a_naive_per_query_loop():
    """contrast_term (inter, all classes) = Eq. (1) computed query by query from its definition on
    the same draw."""
    feats, valid = random_batch()
    b, c, o, m = feats.shape
    args = SimpleNamespace(**contrast_args())
    torch.manual_seed(3)
    loss, n_classes = icon.contrast_term(feats, valid, None, **contrast_args())
    # the same draw: "all" picks classes without randomness, then sample_contrast draws
    torch.manual_seed(3)
    count = valid.sum(-1)
    qc, neg_classes = icon.choose_classes("all", None, None, (count > 0).sum(0) >= 2,
                                          (count > 0).any(0), 0, 0, None)
    s = icon.sample_contrast(valid, qc, neg_classes, args.num_queries, args.num_negatives, False)
    # class-major: entry = (class, instance, pixel)
    pool = feats.transpose(0, 1).reshape(c * b * o, m)
    entry = [(k, n, p) for k in range(c) for n in range(b) for p in range(o)]
    per_class = []
    for a, k in enumerate(qc.tolist()):
        negs = [pool[e] for e in s["neg_index"][a].tolist()]
        assert all(entry[e][0] != k and valid[entry[e][1], entry[e][0], entry[e][2]]
                   for e in s["neg_index"][a])
        losses = []
        for j in s["qi"][a].tolist():
            inst = j // o
            assert valid[inst, k, j % o]  # queries are labeled, visible pixels of the class
            qv = pool[k * b * o + j]
            positives = [pool[k * b * o + n * o + p] for n in range(b) for p in range(o)
                         if n != inst and valid[n, k, p]]
            if not positives:
                continue
            neg_sum = sum(math.exp(float(qv @ v) / args.tau) for v in negs)
            terms = [-math.log(math.exp(float(qv @ v) / args.tau)
                               / (math.exp(float(qv @ v) / args.tau) + neg_sum))
                     for v in positives]
            losses.append(sum(terms) / len(terms))
        if losses:
            per_class.append(sum(losses) / len(losses))
    assert n_classes == len(per_class) > 1
    assert loss.item() == pytest.approx(sum(per_class) / len(per_class), rel=1e-9)


def test_intra_image_loss_matches_the_definition_too():
    """Masked negatives (intra): same per-query definition, negatives = other classes of the query's
    instance."""
    feats, valid = random_batch(seed=1)
    b, c, o, m = feats.shape
    args = SimpleNamespace(**contrast_args(contrast="intra"))
    torch.manual_seed(0)
    loss, _ = icon.contrast_term(feats, valid, None, **contrast_args(contrast="intra"))
    torch.manual_seed(0)
    count = valid.sum(-1)
    qc, neg_classes = icon.choose_classes("all", None, None, (count >= 2).any(0),
                                          (count > 0).any(0), 0, 0, None)
    s = icon.sample_contrast(valid, qc, neg_classes, args.num_queries, args.num_negatives, True)
    per_class = []
    for a, k in enumerate(qc.tolist()):
        losses = []
        for j in s["qi"][a].tolist():
            n, p0 = divmod(j, o)
            qv = feats[n, k, p0]
            pos = [feats[n, k, p] for p in range(o) if p != p0 and valid[n, k, p]]
            neg = [feats[n, k2, p] for k2 in range(c) if k2 != k for p in range(o)
                   if valid[n, k2, p]]
            if pos and neg:
                ns = sum(math.exp(float(qv @ v) / args.tau) for v in neg)
                losses.append(np.mean([-math.log(math.exp(float(qv @ v) / args.tau)
                                                 / (math.exp(float(qv @ v) / args.tau) + ns))
                                       for v in pos]))
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
    # half of the people carry the next class's embeddings
    swapped[::2] = swapped[::2, torch.arange(c).roll(1)]
    losses = []
    for feats in (scattered, together, swapped):
        torch.manual_seed(0)
        losses.append(icon.contrast_term(feats, valid, None, **contrast_args())[0].item())
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
    # the 6 present other classes with the most similar prototypes
    for a, k in enumerate(qc.tolist()):
        sim = (proto @ proto[k]).masked_fill(~present, -2)
        sim[k] = -2
        assert set(neg[a].nonzero()[:, 0].tolist()) == set(sim.topk(6).indices.tolist())
    # PRCC
    qc, neg = icon.choose_classes("hard", hardness[:8], proto[:8], eligible[:8], present[:8], 8, 4,
                                  None)
    assert len(qc) == 7 and (neg.sum(-1) == 4).all()  # 8 pairs, one not eligible
    qc, neg = icon.choose_classes("all", None, proto, eligible, present, 5, 6, None)
    # every eligible class against every other present one
    assert len(qc) == 15 and (neg.sum(-1) == 15).all()
    counts = icon.RANDOM_COUNTS["skcc"]
    for seed in range(5):
        torch.manual_seed(seed)
        qc, neg = icon.choose_classes("random", None, proto, eligible, present, 5, 6, counts)
        assert (counts["queries"][0] <= len(qc) <= counts["queries"][1]
                and len(set(qc.tolist())) == len(qc))
        n = neg.sum(-1)
        assert ((n >= counts["negatives"][0])
                & (n <= counts["negatives"][1])).all() and eligible[qc].all()


@pytest.mark.parametrize("contrast", ["inter", "intra"])
def test_positive_and_negative_masks_respect_instances(contrast):
    feats, valid = random_batch(b=5, c=6, o=4, seed=2)
    b, c, o, _ = feats.shape
    count = valid.sum(-1)
    intra = contrast == "intra"
    eligible = (count >= 2).any(0) if intra else (count > 0).sum(0) >= 2
    qc, neg_classes = icon.choose_classes("all", None, None, eligible, (count > 0).any(0), 0, 0,
                                          None)
    s = icon.sample_contrast(valid, qc, neg_classes, 64, 128, intra)
    inst = torch.arange(b).repeat_interleave(o)
    q_inst = inst[s["qi"]]
    same = q_inst[..., None] == inst
    assert s["pos_mask"].any()
    # never another person: positives of the query's own joint, negatives of its own instance
    if intra:
        assert not (s["pos_mask"] & ~same).any()
        assert not (s["neg_mask"] & ~(q_inst[..., None] == inst.repeat(c))).any()
        assert not (s["pos_mask"] & (s["qi"][..., None] == torch.arange(b * o))).any()  # not itself
    else:
        assert not (s["pos_mask"] & same).any()


def spread_joints(k, w=48, h=64):
    """k joints (input pixels of a 4x-stride map w x h) at least 8 heatmap pixels apart: no region
    overlaps."""
    cols = w // 8
    return torch.tensor([[(4 + 8 * (j % cols)) * 4.0, (4 + 8 * (j // cols)) * 4.0]
                         for j in range(k)])


@pytest.mark.parametrize("data,flags,expected", [
    ("coco", [2, 1, 0] + [2] * 14, [1, 0, 0] + [1] * 14),  # occluded (1) and unlabeled (0) stay out
    # head, neck: a label flag
    ("crowdpose", [2, 1, 0] + [2] * 9 + [1, 1], [1, 0, 0] + [1] * 9 + [1, 1]),
    # no occlusion flag: 2 x labeled, every labeled joint
    ("mpii", [2, 0] + [2] * 14, [1, 0] + [1] * 14),
])
def test_visibility_rule_of_the_step_per_dataset(data, flags, expected):
    """The train step's own rule: gradient at a joint's pixel exactly where the dataset's rule
    counts it visible."""
    args = icon.get_args(["--data", data, "--input-size", "192", "256", "--sampling", "all",
                          "--pretrained", "none", "--num-queries", "32", "--num-negatives", "64"])
    k = args.num_joints
    b, m, (w, h) = 3, 8, args.heatmap_size
    joints = spread_joints(k, w, h)[None].repeat(b, 1, 1)
    vis_flag = torch.tensor(flags, dtype=torch.float32)[None].repeat(b, 1)
    emb = F.normalize(torch.randn(b, m, h, w, generator=torch.Generator().manual_seed(0)),
                      dim=1).requires_grad_()
    batch = dict(image=torch.zeros(b, 3, 256, 192, dtype=torch.uint8), joints=joints,
                 visible=(vis_flag > 0).float(), vis_flag=vis_flag, pid=torch.arange(b))
    torch.manual_seed(0)
    loss, _ = icon.train_step(lambda x: (torch.rand(b, k, h, w), emb), None, batch, args,
                              torch.device("cpu"), None)
    loss.backward()
    grad = emb.grad.abs().sum((0, 1))
    for j in range(k):
        x, y = (joints[0, j] / 4 + 0.5).long().tolist()
        assert bool(grad[y, x] > 0) == bool(expected[j]), (data, j, flags[j])


def test_one_class_per_pixel_no_query_meets_its_own_pixel_as_negative():
    """Overlapping regions (joints 1-3 heatmap pixels apart): every pixel belongs to the joint whose
    Gaussian is highest there, so no (query, negative) pair of SKCC and no pair pixel of PRCC shares
    an instance and a pixel."""
    b, w, h = 4, 16, 16
    # channel = pixel index: a pixel's id
    emb = torch.eye(w * h).reshape(w * h, h, w)[None].repeat(b, 1, 1, 1)
    joints = torch.tensor([[24.0, 24.0], [28.0, 24.0], [32.0, 28.0],
                           [48.0, 52.0]])[None].repeat(b, 1, 1)
    usable = torch.ones(b, 4, dtype=torch.bool)
    offsets = icon.region_offsets(2.0, 0.5)
    feats, valid = icon.keypoint_embeddings(emb, joints, usable, (64, 64), offsets)
    pixel = feats.argmax(-1)  # (B, K, O)
    for n in range(b):  # no pixel of a person under two classes, and each at its nearest centre
        owned = pixel[n][valid[n]]
        assert len(owned) == len(set(owned.tolist()))
    assert valid[:, 3].all() and not valid[:, 0].all()  # the far joint keeps its 21 pixels
    c, o = 4, len(offsets)
    qc, neg = icon.choose_classes("all", None, None, torch.ones(c, dtype=torch.bool),
                                  torch.ones(c, dtype=torch.bool), 0, 0, None)
    torch.manual_seed(0)
    s = icon.sample_contrast(valid, qc, neg, 256, 512, False)
    # class-major pool: (class, instance, offset)
    entry_inst = torch.arange(b).repeat_interleave(o).repeat(c)
    entry_pix = pixel.transpose(0, 1).reshape(-1)
    q_pix = pixel.transpose(0, 1).reshape(c, b * o)[qc[:, None], s["qi"]]  # (nq, Nq)
    n_inst, n_pix = entry_inst[s["neg_index"]], entry_pix[s["neg_index"]]  # (nq, Nn)
    clash = (s["q_inst"][..., None] == n_inst[:, None]) & (q_pix[..., None] == n_pix[:, None])
    assert not clash.any()
    _, pair_valid = icon.pair_embeddings(feats, valid, [(0, 1), (1, 2)])
    assert torch.equal(pair_valid, valid[:, [0, 1]] & valid[:, [1, 2]])


def test_positives_never_come_from_the_same_person():
    """Two crops of one person (same pid) in a batch: no positive between them; a class seen in that
    person alone is no query class."""
    feats, valid = random_batch(b=4, c=5, o=4, seed=3, p_valid=1.0)
    valid[2:, 4] = False  # class 4 only in instances 0 and 1 ...
    person = torch.tensor([7, 7, 8, 9])  # ... which are the same person
    torch.manual_seed(0)
    qc, _ = icon.choose_classes("all", None, None, torch.ones(5, dtype=torch.bool),
                                torch.ones(5, dtype=torch.bool), 0, 0, None)
    s = icon.sample_contrast(valid, qc, torch.ones(len(qc), 5,
                                                   dtype=torch.bool)
                             & ~torch.eye(5, dtype=torch.bool)[qc], 64, 64, False, person)
    inst = torch.arange(4).repeat_interleave(4)
    assert not (s["pos_mask"] & (person[s["q_inst"]][..., None] == person[inst])).any()
    # instance 0 still has positives (2, 3)
    assert s["pos_mask"][:, (s["q_inst"] == 0).nonzero()[:, 1]].any()
    _, used = icon.contrast_term(feats, valid, None, **contrast_args(), person=person)
    _, used_apart = icon.contrast_term(feats, valid, None, **contrast_args())
    assert used == 4 and used_apart == 5
    # class 4 the hardest: not a query class
    hard = dict(contrast_args(sampling="hard"), num_query_classes=1)
    _, used = icon.contrast_term(feats, valid, torch.tensor([0.1, 0.2, 0.3, 0.4, 9.0]), **hard,
                                 person=person)
    assert used == 1


def test_prcc_random_counts_cover_the_reachable_range_uniformly():
    """PRCC's random sampling: 3-5 query pairs, 4-8 negative pairs of which only 4-7 exist (8
    pairs): each reachable count about equally often, 7 not absorbing the unreachable 8."""
    c = len(icon.LIMB_PAIRS["coco"])
    ones = torch.ones(c, dtype=torch.bool)
    counts = icon.RANDOM_COUNTS["prcc"]
    nq, nneg = [], []
    for seed in range(300):
        torch.manual_seed(seed)
        qc, neg = icon.choose_classes("random", None, None, ones, ones, 0, 0, counts)
        nq.append(len(qc))
        nneg += neg.sum(-1).tolist()
    assert set(nq) == {3, 4, 5} and set(nneg) == {4, 5, 6, 7}
    share = np.bincount(nneg, minlength=8)[4:] / len(nneg)
    assert (abs(share - 0.25) < 0.06).all(), share


@pytest.mark.parametrize("data", ["coco", "mpii", "crowdpose"])
def test_limb_pairs_are_the_8_limb_bones(data):
    """Each dataset's 8 PRCC pairs: shoulder-elbow, elbow-wrist, hip-knee, knee-ankle, on both
    sides."""
    names = icon.JOINT_NAMES[data]
    side = {"l": "left", "r": "right"}
    bones = set()
    for i, j in icon.LIMB_PAIRS[data]:
        (si, pi), (sj, pj) = (names[i].split("_", 1), names[j].split("_", 1))
        assert side.get(si, si) == side.get(sj, sj) in ("left", "right"), (names[i], names[j])
        bones.add((side.get(si, si), pi, pj))
    assert bones == {(s, a, b) for s in ("left", "right") for a, b in
                     [("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"),
                      ("knee", "ankle")]}


def test_pair_embeddings_are_the_normalised_mean_of_both_joints():
    feats, valid = random_batch(b=3, c=6, o=5, seed=4)
    pairs = [(0, 2), (3, 1), (4, 5)]
    pf, pv = icon.pair_embeddings(feats, valid, pairs)
    for p, (i, j) in enumerate(pairs):
        mean = (feats[:, i] + feats[:, j]) / 2
        assert torch.allclose(pf[:, p], mean / mean.norm(dim=-1, keepdim=True))
        assert torch.equal(pv[:, p], valid[:, i] & valid[:, j])


def test_class_hardness_ranks_uncertain_and_wrong_joints_and_ignores_unusable_ones():
    """Class 0 confident and right, 1 flat (uncertain), 2 confident at the wrong place; instance 1
    of class 0 is unusable and flat: it does not count."""
    h = w = 8
    target = torch.zeros(2, 3, h, w)
    target[:, :, 4, 4] = 1
    heat = torch.zeros(2, 3, h, w)
    heat[:, 0, 4, 4] = 1
    heat[:, 1] = 1.0 / (h * w)
    heat[:, 2, 0, 0] = 1
    heat[1, 0] = 1.0 / (h * w)
    usable = torch.tensor([[1.0, 1, 1], [0, 1, 1]])
    hard = icon.class_hardness(heat, target, usable)
    assert hard[0] < 0.05 and hard[1] > hard[0] + 0.9 and hard[2] > hard[0] + 0.9
    flat_mse = ((1 - 1 / 64) ** 2 + 63 / 64 ** 2) / 64
    # entropy max (1) + MSE relative to class 2's
    assert hard[1] == pytest.approx(1 + flat_mse / (2 / 64), abs=1e-4)
    assert hard[2] == pytest.approx(0 + 1, abs=1e-4)  # a one-hot map has entropy 0; the largest MSE


def test_the_contrast_block_lifts_out_with_torch_alone():
    """SKCC + PRCC as a user lifts them: the block of icon.py between its two section headers, run
    with torch imports only and explicit keyword arguments, gives icon.py's loss."""
    src = open(icon.__file__).read()
    block = src[src.index("# ICON's contrast, SKCC"):src.index("# The train step")]
    ns = {}
    exec("import math\nimport torch\nimport torch.nn.functional as F\n" + block, ns)
    g = torch.Generator().manual_seed(0)
    b, k, m, h, w = 4, 17, 8, 24, 16
    emb = F.normalize(torch.randn(b, m, h, w, generator=g), dim=1)
    joints = torch.rand(b, k, 2, generator=g) * torch.tensor([64.0, 96.0])
    usable = torch.rand(b, k, generator=g) < 0.8
    target, _ = icon.gaussian_targets(joints, usable.float(), (64, 96), (w, h))
    kw = dict(input_size=(64, 96), pairs=icon.LIMB_PAIRS["coco"], num_queries=32, num_negatives=64,
              person=torch.tensor([0, 1, 1, 2]))
    torch.manual_seed(0)
    lifted, terms = ns["icon_contrast"](torch.rand(b, k, h, w, generator=g.manual_seed(1)), emb,
                                        joints, target, usable, **kw)
    torch.manual_seed(0)
    ours, _ = icon.icon_contrast(torch.rand(b, k, h, w, generator=g.manual_seed(1)), emb, joints,
                                 target, usable, **kw)
    assert set(terms) == {"skcc", "prcc"} and lifted > 1 and torch.equal(lifted, ours)
    # the paper's λ1, λ2 by default
    assert torch.equal(lifted, 0.3 * terms["skcc"] + 0.7 * terms["prcc"])


def test_flip_carries_the_visibility_flag_with_its_joint(tiny):
    """A flipped crop swaps left and right joints: the raw flag goes with them (else the contrast's
    visibility would describe the other side)."""
    from common.datasets import load_coco, read_coco
    ann, images = tiny[tiny.index("--val-ann") + 1], tiny[tiny.index("--val-images") + 1]
    records, _ = read_coco(load_coco(ann), images, 0.75)
    # left and right differ
    record = dict(records[0], vis_flag=np.array([2, 2, 1] * 5 + [2, 1], np.float32))
    kw = dict(train=True, scale_factor=0.0, rot_factor=0.0)
    flipping = TopDownDataset([record], (64, 96), COCO_FLIP_PAIRS, [], flip=True, **kw)
    plain = TopDownDataset([record], (64, 96), COCO_FLIP_PAIRS, [], flip=False, **kw)
    perm = torch.tensor(flipping.flip_perm)
    flipped = 0
    for epoch in range(12):
        flipping.set_epoch(epoch)
        plain.set_epoch(epoch)
        a, p = flipping[0], plain[0]
        if not torch.equal(a["image"], p["image"]):
            flipped += 1
            assert (torch.equal(a["vis_flag"], p["vis_flag"][perm])
                    and torch.equal(a["visible"], p["visible"][perm]))
        else:
            assert torch.equal(a["vis_flag"], p["vis_flag"])
    assert 0 < flipped < 12


def test_imagenet_initialisation_by_default_scratch_on_request():
    # ResNet presets: ImageNet (the paper)
    assert icon.get_args(["--data", "coco"]).pretrained == "torchvision"
    assert icon.get_args(["--data", "demo"]).pretrained == "none"  # the demo's preset: scratch
    # nothing to download
    assert icon.get_args(["--data", "coco", "--summary"]).pretrained == "none"
    args = icon.get_args(["--data", "mpii", "--pretrained", "none"])
    # scratch: no file, no download
    assert args.pretrained == "none" and icon.build_model(args)[2] is None
    with pytest.raises(UserError, match="hrnet_w32-36af842e.pth.*--pretrained none"):
        # never scratch by omission
        icon.get_args(["--data", "crowdpose", "--backbone", "hrnet_w32"])
    assert icon.get_args(["--data", "demo", "--backbone", "hrnet_w32"]).pretrained == "none"


def test_hrnet_tap_and_head_shapes():
    args = icon.get_args(["--data", "coco", "--backbone", "hrnet_w32", "--input-size", "48", "64",
                          "--embed-dim", "16", "--pretrained", "none"])
    pose, head, _ = icon.build_model(args)
    # the official W32, 17 joints: no head inside
    assert sum(p.numel() for p in pose.parameters()) == 28_536_113
    heat, tap = icon.Tapped(pose).eval()(torch.zeros(1, 3, 64, 48))
    assert heat.shape == (1, 17, 16, 12) and tap.shape == (1, 32 + 64 + 128, 16, 12)
    z = head.eval()(tap)
    assert (z.shape == (1, 16, 16, 12) and torch.allclose(z.norm(dim=1), torch.ones(1, 16, 12),
                                                          atol=1e-5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=24, n_val=8)
    return ["--data", "coco", "--ann", f"{root}/annotations/person_keypoints_train2017.json",
            "--images", f"{root}/train2017", "--val-ann",
            f"{root}/annotations/person_keypoints_val2017.json", "--val-images", f"{root}/val2017"]


def test_raw_visibility_flag_reaches_the_batch(tiny):
    from common.datasets import load_coco, read_coco
    ann, images = tiny[tiny.index("--val-ann") + 1], tiny[tiny.index("--val-images") + 1]
    coco = load_coco(ann)
    records, _ = read_coco(coco, images, 0.75)
    raw = {a["id"]: np.array(a["keypoints"][2::3]) for a in coco.dataset["annotations"]}
    flags = [r["vis_flag"] for r in records]
    # the demo has both
    assert any((f == 1).any() for f in flags) and any((f == 2).any() for f in flags)
    assert all(any(np.array_equal(f, v) for v in raw.values()) for f in flags)
    item = TopDownDataset(records, (64, 96), COCO_FLIP_PAIRS, [])[0]
    assert torch.equal(item["vis_flag"], torch.tensor(flags[0], dtype=torch.float32))


def test_all_three_terms_fall_on_a_real_batch(tiny):
    """A few Adam steps of Eq. (5) on one batch of demo images lower the MSE, SKCC and PRCC terms
    together."""
    torch.manual_seed(0)
    args = icon.get_args(tiny + SMALL + ["--num-queries", "64", "--num-negatives", "128"])
    pose, head, _ = icon.build_model(args)
    model = icon.ICON(icon.Tapped(pose), [head]).train()
    train, _, _ = build_data(args, train=True)
    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        torch.manual_seed(1)  # the same draw of queries and negatives each step
        loss, terms = icon.train_step(model, None, batch, args, torch.device("cpu"), None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(terms)
    for k in ("mse", "skcc", "prcc"):
        assert history[-1][k] < 0.8 * history[0][k], (k, [float(h[k]) for h in history])


def test_run_writes_outputs_and_saves_the_pose_network_alone(tiny, tmp_path):
    out = tmp_path / "icon"
    p = run_script("icon.py", tiny + SMALL + ["--iters", "2", "--lr-steps", "9", "--num-queries",
                                              "32", "--num-negatives", "64", "--out", out])
    for name in ["checkpoint.pth", "best.pth", "log.jsonl", "metrics.json",
                 "person_keypoints_val2017_icon_results.json", "predictions.png"]:
        assert (out / name).stat().st_size > 0, name
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(log[k]) for k in ("loss", "mse", "skcc", "prcc"))
    # Fig. 5 runs on the saved model, outside training
    assert not any(k.startswith("embed") for k in log) and not (out / "embeddings.png").exists()
    p = run_script("-m", ["eval.icon_embeddings", "--checkpoint", out / "best.pth"])
    assert "embeddings (tapped features, val): same-class cosine" in p.stdout
    assert (out / "embeddings.png").stat().st_size > 0
    sep = json.loads((out / "embeddings.json").read_text())
    assert (all(np.isfinite(sep[k]) for k in ("embed_same", "embed_other", "embed_sep"))
            and sep["embed_sep"] == pytest.approx(sep["embed_same"] - sep["embed_other"]))
    assert log["loss"] > log["mse"] and "AP" in log["metrics"]
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["model"]
    args = icon.get_args(tiny + SMALL)
    pose, head, _ = icon.build_model(args)
    # the baseline's tensors, none of the projection head's
    assert set(best) == set(pose.state_dict())
    assert not any(k in best for k in ("head.net.0.weight", "net.0.weight"))
    # kept to resume
    assert "proj" in torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    # the inference model is a SimpleBaseline checkpoint: what `mrpose.py --eval-only --weights`
    # builds and loads
    mr_args = mrpose.get_args(tiny + ["--backbone", "resnet18", "--head-channels", "32",
                                      "--pretrained", "none"])
    mr_model, _ = mrpose.build_model(mr_args)
    load_weights(mr_model, out / "best.pth")
    x = torch.randn(2, 3, 96, 64)
    pose.load_state_dict(best)
    assert torch.equal(mr_model.eval()(x), pose.eval()(x))


def test_torchrun_two_ranks(tiny, tmp_path):
    out = tmp_path / "ddp"
    p = run_script("icon.py", tiny + SMALL + ["--iters", "2", "--lr-steps", "9", "--num-queries",
                                              "16", "--num-negatives", "32", "--out", out],
                   torchrun=True)
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
    args = icon.get_args(["--data", "crowdpose", "--val-ann", str(no_index), "--val-images",
                          str(tmp_path)])
    with pytest.raises(UserError, match="crowdIndex") as e:
        build_data(args, train=False)
    # run_main prints it as one line
    assert str(no_index) in str(e.value) and "\n" not in str(e.value)


@needs_shared
def test_crowdpose_oracle_through_the_pipeline():
    """--data crowdpose reads the official json and scores with crowdposetools' metric: the ground
    truth through the heatmap path scores near 1 (quantisation only)."""
    root = SHARED / "crowdpose"
    args = icon.get_args(["--data", "crowdpose", "--val-ann",
                          str(root / "annotations" / "test_crowdpose.json"), "--val-images",
                          str(root / "images"), "--workers", "0"])
    _, val, info = build_data(args, train=False)
    metrics, results, _ = evaluate(torch.nn.Identity(), val, args, torch.device("cpu"), info,
                                   oracle=True)
    assert (set(metrics) >= {"AP", "AP_easy", "AP_medium", "AP_hard"}
            and metrics["AP"] > 0.9), metrics
    assert len(results[0]["keypoints"]) == 42
