"""Tests of common/devaug.py: the batched photometric ops against the per-image PIL ones,
the laws of their draws against MoCo v2's torchvision pipeline, the worker half's crops, the
scripts' --aug-device, and the affine_grid top-down crops against common/transforms.warp_image on
real COCO images."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import ImageFilter

from common import devaug
from common.datasets import load_coco, read_coco, read_image
from common.ssl import GaussianBlur, moco_v2_appearance
from common.transforms import affine_matrix, apply_affine, to_tensor_uint8, warp_image
from common.utils import UserError
from helpers import SHARED, run_script

COCO_MINI = SHARED / "coco_mini"
need_coco = pytest.mark.skipif(not (COCO_MINI / "train2017").is_dir(),
                               reason="shared COCO sample not here")


@pytest.fixture(scope="module")
def crops():
    """Six 96 px crops of real photographs (colour, edges, flat areas), as PIL images and a [0, 1]
    batch."""
    if not (COCO_MINI / "train2017").is_dir():
        pytest.skip("shared COCO sample not here")
    files = sorted((COCO_MINI / "train2017").glob("*.jpg"))[:6]
    imgs = [TF.resized_crop(read_image(str(f)), 40, 60, 240, 240, [96, 96]) for f in files]
    return imgs, torch.stack([to_tensor_uint8(i) for i in imgs]).float() / 255


def error(batch, pil_images):
    """|batched - PIL| in 8-bit levels, per pixel."""
    return (batch * 255 - torch.stack([to_tensor_uint8(p) for p in pil_images]).float()).abs()


# ----------------------------------------------------------------------------------------------
#   each op, fixed factors

# PIL rounds to 8 bits after each op (its blend truncates): within 1.5 levels of the float result
@need_coco
@pytest.mark.parametrize("name,op,pil_op",
                         [("brightness", devaug.adjust_brightness, TF.adjust_brightness),
                          ("contrast", devaug.adjust_contrast, TF.adjust_contrast),
                          ("saturation", devaug.adjust_saturation, TF.adjust_saturation)])
def test_blend_ops_match_pil_within_rounding(crops, name, op, pil_op):
    imgs, x = crops
    for f in (0.6, 0.83, 1.17, 1.4):
        err = error(op(x, torch.full((len(x),), f)), [pil_op(i, f) for i in imgs])
        assert err.max() <= 1.5, (name, f, err.max())
    # one factor per image: image k's result is that of its own factor
    fs = torch.linspace(0.6, 1.4, len(x))
    assert error(op(x, fs), [pil_op(i, float(f)) for i, f in zip(imgs, fs)]).max() <= 1.5


@need_coco
def test_grayscale_matches_pil_within_rounding(crops):
    imgs, x = crops
    assert error(devaug.grayscale(x), [TF.rgb_to_grayscale(i, 3) for i in imgs]).max() <= 1.0


@need_coco
def test_hue_is_torchvisions_and_near_pils(crops):
    """Exactly torchvision's tensor adjust_hue (HSV round trip); PIL's goes through 8-bit HSV (hue
    in 1/256 turns), so single pixels differ by up to ~10 levels, the mean by under half a level."""
    imgs, x = crops
    for h in (-0.1, -0.04, 0.02, 0.1):
        out = devaug.adjust_hue(x, torch.full((len(x),), h))
        exact = torch.stack([TF.adjust_hue(xi, h) for xi in x])
        assert (out - exact).abs().max() * 255 < 0.01, h
        err = error(out, [TF.adjust_hue(i, h) for i in imgs])
        assert err.mean() < 0.5 and err.max() <= 12, (h, err.mean(), err.max())


@need_coco
def test_blur_near_pils_gaussian_blur(crops):
    """A true Gaussian (radius 3σ, edges repeated) vs PIL's three box blurs: mean under 0.75 levels,
    99 % of pixels within 2.5 levels (the box approximation's worst pixels, on sharp edges, reach
    ~16 at σ 2)."""
    imgs, x = crops
    for s in (0.1, 0.5, 1.0, 1.5, 2.0):
        err = error(devaug.gaussian_blur(x, torch.full((len(x),), s)),
                    [i.filter(ImageFilter.GaussianBlur(s)) for i in imgs])
        assert err.mean() < 0.75 and err.flatten().quantile(0.99) <= 2.5, (s, err.mean())
    sig = torch.tensor([0.1, 2.0, 0.1, 2.0, 0.1, 2.0])  # per image: sharp images stay sharp
    err = error(devaug.gaussian_blur(x, sig), [i.filter(ImageFilter.GaussianBlur(float(s)))
                                               for i, s in zip(imgs, sig)])
    assert err.mean() < 0.75


@need_coco
def test_jitter_order_is_per_image(crops):
    """Brightness then contrast differs from contrast then brightness (clipping); each image takes
    its own."""
    imgs, x = crops
    n = len(x)
    draws = dict(jitter=torch.ones(n, dtype=torch.bool), gray=torch.zeros(n, dtype=torch.bool),
                 blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n),
                 factors=torch.tensor([[1.4, 0.6, 1.3, 0.08]] * n),
                 order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]] * (n // 2)))
    out = devaug.apply_appearance(x, draws)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k, (img, xk) in enumerate(zip(imgs, x)):
        ref, exact = img, xk
        for op_id in draws["order"][k].tolist():
            f = float(draws["factors"][k, op_id])
            ref, exact = ops[op_id](ref, f), ops[op_id](exact, f)
        # torchvision's tensor chain to float precision; PIL's, rounded after each of four ops,
        # within 1.75 levels on average (the other order is 2.2 to 8 levels away)
        assert (out[k] - exact).abs().max() * 255 < 0.01, k
        assert error(out[k:k + 1], [ref]).mean() < 1.75, k


# ---------------------------------------------------------------------------------------------- the
#   laws of the draws

def test_draws_follow_moco_v2s_torchvision_pipeline():
    """Probabilities, ranges and orders of 40,000 draws (fixed seed) against the objects of the
    per-image pipeline: the probabilities within 4.5 binomial standard deviations, factors uniform
    over the same intervals, the 24 jitter orders equally likely."""
    jitter_apply, gray, blur_apply = moco_v2_appearance().transforms
    cj, blur = jitter_apply.transforms[0], blur_apply.transforms[0]
    assert isinstance(cj, T.ColorJitter) and isinstance(blur, GaussianBlur)
    n = 40000
    d = devaug.draw_appearance(n, torch.Generator().manual_seed(0))
    for drawn, p in [(d["jitter"], jitter_apply.p), (d["gray"], gray.p), (d["blur"], blur_apply.p)]:
        assert (abs(drawn.float().mean() - p) < 4.5
                * math.sqrt(p * (1 - p) / n)), (drawn.float().mean(), p)
    ranges = [cj.brightness, cj.contrast, cj.saturation, cj.hue, blur.sigma]
    values = list(d["factors"].T) + [d["sigma"]]
    for v, (lo, hi) in zip(values, ranges):
        width = hi - lo
        assert lo <= v.min() < lo + 0.001 * width and hi - 0.001 * width < v.max() <= hi, (lo, hi)
        assert abs(v.mean() - (lo + hi) / 2) < 4.5 * width / math.sqrt(12 * n)
        # uniform: each tenth of the interval holds a tenth of the draws
        counts = torch.histc(v, bins=10, min=lo, max=hi)
        assert (counts - n / 10).abs().max() < 4.5 * math.sqrt(n / 10 * 0.9), counts
    assert sorted(d["order"][0].tolist()) == [0, 1, 2, 3]
    codes = (d["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    assert (counts > 0).sum() == 24
    assert (counts[counts > 0] - n / 24).abs().max() < 4.5 * math.sqrt(n / 24), counts[counts > 0]


def test_views_have_the_per_image_paths_law():
    """End to end on one small real-looking crop, 600 views each way: the share of gray views (p
    0.2, no other op makes R = G = B exactly) and the spread of mean brightness agree between the
    per-image PIL path and worker crop + BatchAppearance (same seed, different streams: a law check,
    not equality)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.rand(3, 8, 8, generator=g) * 200 + 20).to(torch.uint8)
    base = torch.nn.functional.interpolate(base[None].float(), size=48,
                                           mode="bilinear")[0].to(torch.uint8)
    img = TF.to_pil_image(base)
    torch.manual_seed(0)
    n, per_image = 600, moco_v2_appearance()
    ref = torch.stack([to_tensor_uint8(per_image(img)) for _ in range(n)]).float() / 255
    views = torch.stack([devaug.crop_flip(img, 48, scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
                         for _ in range(n)])
    out = devaug.BatchAppearance(torch.device("cpu"))(views)
    out = (out * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1,
                                                          1)
           + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    share_gray = lambda v: ((v[:, 0] - v[:, 1]).abs().amax((1, 2)) < 1e-3).float().mean()
    assert abs(share_gray(ref) - share_gray(out)) < 0.07, (share_gray(ref), share_gray(out))
    assert abs(share_gray(out) - 0.2) < 0.05
    m_ref, m_out = ref.mean((1, 2, 3)), out.mean((1, 2, 3))
    assert abs(m_ref.mean() - m_out.mean()) < 0.02 and abs(m_ref.std() / m_out.std() - 1) < 0.15


# ----------------------------------------------------------------------------------------------
#   worker half

def test_crop_flip_is_torchvisions_crop_and_flip():
    """The same draws as RandomResizedCrop(scale 0.2-1) + RandomHorizontalFlip, the same pixels, and
    the geometry [top, left, h, w, flip] LiftedCL inverts."""
    img = TF.to_pil_image((torch.rand(3, 60, 80,
                                      generator=torch.Generator().manual_seed(1))
                           * 255).to(torch.uint8))
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        view, geom = devaug.crop_flip(img, 32)
        torch.manual_seed(seed)
        ref = T.RandomHorizontalFlip()(T.RandomResizedCrop(32, scale=(0.2, 1.0))(img))
        assert view.dtype == torch.uint8 and torch.equal(view, to_tensor_uint8(ref))
        top, left, h, w, flip = geom.tolist()
        cut = TF.resized_crop(img, int(top), int(left), int(h), int(w), [32, 32])
        assert torch.equal(view, to_tensor_uint8(TF.hflip(cut) if flip else cut))
        flips += int(flip)
    assert 0 < flips < 8


def test_resolve_aug_device():
    cpu = torch.device("cpu")
    assert devaug.resolve_aug_device("auto", cpu) is None  # today's per-image path on a CPU run
    assert devaug.resolve_aug_device("workers", cpu) is None
    assert devaug.resolve_aug_device("cpu", cpu) == cpu
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--aug-device cuda"):
            devaug.resolve_aug_device("cuda", cpu)


@pytest.mark.parametrize("script,extra",
                         [("mscl", []), ("liftedcl", ["--moco-k", "16", "--prior-size", "200"])])
def test_scripts_train_with_aug_device_cpu(tmp_path, monkeypatch, script, extra):
    """Two iterations with the batched photometric part on the CPU, in process: the workers hand
    over uint8 crops, each view of each batch goes through BatchAppearance once, and the loss is
    finite."""
    import importlib
    import sys
    from data.demo import make_demo
    module = importlib.import_module(script)
    calls = []

    class Recording(devaug.BatchAppearance):
        def __call__(self, views):
            calls.append((views.dtype, tuple(views.shape)))
            return super().__call__(views)

    monkeypatch.setattr(module, "BatchAppearance", Recording)
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=16, n_val=2)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--data", "folder", "--images",
                                      f"{root}/train2017", "--backbone", "resnet18", "--crop-size",
                                      "32", "--batch-size", "8", "--workers", "0", "--iters", "2",
                                      "--epochs", "1", "--device", "cpu", "--aug-device", "cpu",
                                      "--out", str(out)] + extra)
    module.main()
    assert calls == [(torch.uint8, (8, 3, 32, 32))] * 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["loss"])


# ----------------------------------------------------------------------------------------------
#   top-down crops

@need_coco
def test_warp_crops_match_pil_warp_on_coco():
    """Real COCO persons at full-size decode, with rotation, flip and scale as in training: the
    affine_grid crops (float) equal warp_image's within PIL's 8-bit rounding of the bilinear blend
    (one level at most), and pixels move with the joints (the same matrices give the joints, see
    test_jpeg_crops_match_topdown_dataset)."""
    records, _ = read_coco(load_coco(str(COCO_MINI / "annotations"
                                         / "person_keypoints_train2017.json")),
                           str(COCO_MINI / "train2017"), 192 / 256)
    rng = np.random.default_rng(0)
    size = (192, 256)
    images, mats, ref = [], [], []
    for r in records[:8]:
        img = read_image(r["image"])
        flip = bool(rng.random() < 0.5)
        m = affine_matrix(r["center"], r["scale"] * rng.uniform(0.7, 1.3), rng.uniform(-40, 40),
                          size, flip=flip, image_width=img.width)
        images.append(to_tensor_uint8(img))
        mats.append(m)
        ref.append(to_tensor_uint8(warp_image(img, m, size)))
    assert len({im.shape for im in images}) > 1  # images of several sizes in one batch
    out = devaug.warp_crops(images, np.stack(mats), size)
    err = (out - torch.stack(ref).float()).abs()
    assert out.shape == (len(images), 3, 256, 192)
    # measured: 0.44 and 1.002
    assert err.mean() < 0.6 and err.max() < 1.01, (err.mean(), err.max())
    # pixels and joints move together: a 9x9 square drawn around each labeled joint has its centroid
    # where apply_affine puts the joint
    checked = 0
    for r, m, im in zip(records, mats, images):
        for (x, y), v in zip(np.round(r["joints"]), r["visible"]):
            tx, ty = apply_affine(np.array([x, y]), m)
            if v <= 0 or not (8 <= tx < size[0] - 8 and 8 <= ty < size[1] - 8):
                continue
            square = torch.zeros_like(im)
            square[:, int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5] = 255
            crop = devaug.warp_crops([square], m[None], size)[0, 0]
            ys, xs = torch.meshgrid(torch.arange(size[1]), torch.arange(size[0]), indexing="ij")
            cx, cy = float((crop * xs).sum() / crop.sum()), float((crop * ys).sum() / crop.sum())
            assert abs(cx - tx) < 0.5 and abs(cy - ty) < 0.5, ((cx, cy), (tx, ty))
            checked += 1
    assert checked > 20


@need_coco
def test_jpeg_crops_match_topdown_dataset(monkeypatch):
    """--data-device's path (bytes and geometry in the worker, decode_jpeg + warp_crops on the
    batch) against TopDownDataset with the reduced-size JPEG decode switched off, training draws
    on (half body, scale, rotation, flip) over two epochs, the second with --semi's per-item keys:
    joints, flags, centres, scales and person ids identical, crops within one level (the same
    libjpeg decode on the CPU; nvJPEG on a GPU is not held to this)."""
    from common import datasets
    from common.datasets import COCO_FLIP_PAIRS, COCO_UPPER
    full = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda path, scale=1.0: full(path))
    records, _ = read_coco(load_coco(str(COCO_MINI / "annotations"
                                         / "person_keypoints_train2017.json")),
                           str(COCO_MINI / "train2017"), 192 / 256)
    kw = dict(train=True, half_body_prob=0.3, half_body_min_joints=3, seed=5)
    ref_ds = datasets.TopDownDataset(records[:12], (192, 256), COCO_FLIP_PAIRS, COCO_UPPER, **kw)
    ds = devaug.JpegCrops(records[:12], (192, 256), COCO_FLIP_PAIRS, COCO_UPPER, **kw)
    for epoch, keys in ((0, range(len(ds))), (1, [(i, (i + 7, 1)) for i in range(len(ds))])):
        ref_ds.set_epoch(epoch)
        ds.set_epoch(epoch)
        ref = torch.utils.data.default_collate([ref_ds[k] for k in keys])
        batch = devaug.decode_crops({"labeled": devaug.collate_jpeg([ds[k] for k in keys])},
                                    torch.device("cpu"), (192, 256))["labeled"]
        for k in ("joints", "visible", "vis_flag", "center", "scale", "index", "pid"):
            assert torch.equal(batch[k], ref[k]), k
        err = (batch["image"].float() - ref["image"].float()).abs()
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == ref["image"].shape
        assert err.mean() < 0.6 and err.max() <= 1, (err.mean(), err.max())  # measured: 0.45 and 1


def test_jpeg_crops_refuse_other_formats(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="a.png: PNG image"):
        devaug.read_jpeg(str(tmp_path / "a.png"))


@pytest.mark.parametrize("script", ["mrpose", "icon"])
def test_topdown_scripts_train_with_data_device_cpu(tmp_path, monkeypatch, script):
    """Two iterations with --data-device cpu, in process: every training batch reaches decode_crops
    as JPEG bytes and leaves it as uint8 crops of the input size; the loss is finite."""
    import importlib
    import sys
    from data.demo import make_demo
    module = importlib.import_module(script)
    seen = []

    def recording(batch, device, output_size):
        seen.append(len(batch["jpeg"]))
        out = devaug.decode_crops(batch, device, output_size)
        assert (out["image"].dtype == torch.uint8
                and out["image"].shape == (len(out["joints"]), 3, 96, 64))
        return out

    monkeypatch.setattr(module, "decode_crops", recording)
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=16, n_val=4)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--data", "coco", "--pretrained", "none",
                                      "--ann",
                                      f"{root}/annotations/person_keypoints_train2017.json",
                                      "--images", f"{root}/train2017", "--val-ann",
                                      f"{root}/annotations/person_keypoints_val2017.json",
                                      "--val-images", f"{root}/val2017", "--backbone", "resnet18",
                                      "--input-size", "64", "96", "--batch-size", "8", "--workers",
                                      "0", "--iters", "2", "--device", "cpu", "--data-device",
                                      "cpu", "--out", str(out)])
    module.main()
    assert seen == [8, 8]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["loss"])


def test_warp_crops_edges_as_pil():
    """A crop hanging over the image's edges: inside the image the edge pixels repeat up to the
    boundary, outside it is black, as PIL's transform (not grid_sample's zero padding, which darkens
    the last half pixel)."""
    from PIL import Image
    img = Image.new("RGB", (40, 30), (200, 120, 40))
    # zoom 1.2, off the grid
    m = affine_matrix(np.array([35.3, 5.6]), np.array([40.0, 53.3]), 0.0, (48, 64))
    ref = to_tensor_uint8(warp_image(img, m, (48, 64))).float()
    out = devaug.warp_crops([to_tensor_uint8(img)], m[None], (48, 64))[0]
    assert (ref == 0).any() and (ref == 200).any()
    assert (out - ref).abs().max() <= 1


@need_coco
def test_bench_data_prints_every_stage(capsys, monkeypatch):
    """python -m eval.bench_data on the 4 shared COCO val images, one round: every stage and pair
    rate is printed with a positive rate, and --device cpu adds the batched halves."""
    import sys
    from eval import bench_data
    monkeypatch.setattr(sys, "argv", ["bench_data", "--images", str(SHARED / "coco" / "images"),
                                      "--rounds", "1", "--size", "64", "--batch", "4", "--device",
                                      "cpu", "--device-batch", "4"])
    bench_data.main()
    out = capsys.readouterr().out
    for row in ["decode (per image)", "before: per-image PIL view",
                "after: worker crop + flip (uint8)", "after: batched colour/gray/blur, CPU",
                "before (per-image PIL)", "after, --aug-device cuda", "after, --aug-device cpu",
                "cpu: BatchAppearance", "cpu: decode_crops"]:
        line = next(ln for ln in out.splitlines() if row in ln)
        assert (float(line.split()[-1] if "/s" not in line
                      else line.split("/s")[0].split()[-1]) > 0), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script,flag", [("mscl.py", "--aug-device"),
                                         ("liftedcl.py", "--aug-device"),
                                         ("mrpose.py", "--data-device"),
                                         ("icon.py", "--data-device")])
def test_cuda_paths_without_cuda_are_one_line_errors(tmp_path, script, flag):
    """Refused before any data is read (the empty data root would be the error otherwise)."""
    from helpers import assert_one_line_error
    init = [] if script == "mscl.py" else ["--pretrained", "none"]  # mscl.py always starts fresh
    p = run_script(script, ["--data", "coco", "--data-root", tmp_path, flag, "cuda", "--device",
                            "cpu"] + init, expect=2)
    assert_one_line_error(p, f"{flag} cuda: no CUDA device")
