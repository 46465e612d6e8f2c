"""End-to-end tests of mrpose.py: outputs, DDP, resume, bad input, the oracle on real data."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mrpose
from common.datasets import COCO_FLIP_PAIRS, COCO_UPPER, TopDownDataset, load_coco, read_coco
from common.heatmap import gaussian_targets, joints_mse_loss
from common.transforms import normalize
from data.demo import make_demo
from helpers import SHARED, assert_one_line_error, run_script

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
SMALL = ["--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers",
         "0", "--print-freq", "1"]


def run(args, expect=0, torchrun=False):
    return run_script("mrpose.py", args, expect, torchrun)


def results_of(out, split="val2017"):
    """The COCO results file of a run, under COCO's name
    person_keypoints_[split]_[alg]_results.json."""
    return json.loads(
        (out / f"person_keypoints_{split}_{out.name.replace('_', '-')}_results.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 24-image demo set in COCO format, and the flags that point mrpose.py at it."""
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=24, n_val=8)
    flags = ["--data", "coco", "--pretrained", "none", "--ann",
             f"{root}/annotations/person_keypoints_train2017.json", "--images", f"{root}/train2017",
             "--val-ann", f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
             f"{root}/val2017"]
    return root, flags


def test_demo_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    p = run(["--data", "demo", "--iters", "3", "--batch-size", "8", "--workers", "0", "--out", out])
    assert "val: AP" in p.stdout
    for name in ["checkpoint.pth", "best.pth", "log.jsonl", "metrics.json",
                 "person_keypoints_val2017_run_results.json", "predictions.png"]:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APm", "APl", "AR"}
    results = results_of(out)
    assert results and len(results[0]["keypoints"]) == 51
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 3 and np.isfinite(log[-1]["loss"]) and "metrics" in log[-1]
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ({"model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "args",
             "rng"} <= set(ckpt))
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert not list(out.glob(".tmp-*"))  # nothing half-written is left behind


def test_summary_prints_parameters_and_flops():
    p = run(["--data", "coco", "--arch", "mrfeanet2", "--backbone", "resnet50", "--summary"])
    assert ("80,141,137 parameters" in p.stdout and "GFLOPs" in p.stdout
            and "(--data coco preset)" in p.stdout)
    # the demo preset's narrow head is said, not silently counted as the paper's model
    p = run(["--summary"])
    assert "64-channel head (the paper's is 256)" in p.stdout and "(--data demo preset)" in p.stdout


def test_resume_continues_exactly(tiny, tmp_path):
    _, flags = tiny
    common = flags + SMALL + ["--lr-steps", "1", "--no-flip-test"]
    run(common + ["--epochs", "2", "--out", tmp_path / "straight"])
    run(common + ["--epochs", "1", "--out", tmp_path / "resumed"])
    run(common + ["--epochs", "2", "--out", tmp_path / "resumed", "--resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 2 * (a["iteration"] // 2) > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # the resumed log holds each epoch once, with the uninterrupted run's losses
    def losses(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [(e["epoch"], e["loss"]) for e in map(json.loads, lines)]
    assert losses("resumed") == losses("straight") and len(losses("straight")) == 2


def test_resume_refuses_a_checkpoint_that_no_longer_fits(tmp_path):
    """--resume of a checkpoint whose model has another shape is one line naming the tensor."""
    from common.utils import UserError, rng_state
    args = mrpose.get_args(SMALL + ["--out", str(tmp_path)])
    model = mrpose.build_model(args)[0]
    optimizer = torch.optim.Adam(model.parameters())
    state = dict(model.state_dict(), **{"final_layer.weight": torch.zeros(16, 64, 1, 1)})
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 1, "iteration": 2,
                "best": 0.0, "args": dict(vars(args), bgr=False), "rng": [rng_state()]},
               tmp_path / "old.pth")
    with pytest.raises(UserError, match=r"old\.pth: does not fit this model \(1 tensors differ, "
                                        r"e\.g\. final_layer\.weight: expected \(17, 64, 1, 1\), "
                                        r"found \(16, 64, 1, 1\)") as e:
        mrpose.resume(str(tmp_path / "old.pth"), args, model, None, optimizer=optimizer)
    assert len(str(e.value).splitlines()) == 1


def test_torchrun_two_ranks_trains_and_evaluates_like_one_process(tiny, tmp_path):
    _, flags = tiny
    out = tmp_path / "ddp"
    p = run(flags + SMALL + ["--iters", "2", "--lr-steps", "100", "--out", out], torchrun=True)
    assert "val: AP" in p.stdout
    ddp_metrics = json.loads((out / "metrics.json").read_text())
    single = tmp_path / "single"
    run(flags + SMALL + ["--eval-only", "--weights", out / "checkpoint.pth", "--out", single])
    assert json.loads((single / "metrics.json").read_text()) == ddp_metrics
    # every rank evaluated rank 0's saved weights, BatchNorm statistics included
    assert results_of(out) == results_of(single)
    ddp_eval = tmp_path / "ddp_eval"
    run(flags + SMALL + ["--eval-only", "--weights", out / "checkpoint.pth", "--out", ddp_eval],
        torchrun=True)
    assert results_of(ddp_eval) == results_of(single)


def test_test_dev_image_info_with_detections_writes_server_file_and_no_metrics(tiny, tmp_path):
    root = Path(tiny[0])
    val = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    dets = [dict(image_id=a["image_id"], category_id=1, bbox=a["bbox"], score=0.9)
            for a in val["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    info = dict(images=val["images"], categories=[dict(id=1, name="person",
                                                       supercategory="person")])
    (tmp_path / "image_info_test-dev2017.json").write_text(json.dumps(info))
    out = tmp_path / "mine"
    p = run(SMALL + ["--data", "coco", "--val-ann", tmp_path / "image_info_test-dev2017.json",
                     "--val-images", root / "val2017", "--det-json", tmp_path / "dets.json",
                     "--eval-only", "--out", out])
    assert "COCO evaluation server" in p.stdout and "AP" not in p.stdout
    assert json.loads((out / "metrics.json").read_text()) == {}
    results = results_of(out, "test-dev2017")
    assert {r["image_id"] for r in results} == {a["image_id"] for a in val["annotations"]}
    p = run(SMALL + ["--data", "coco", "--val-ann", tmp_path / "image_info_test-dev2017.json",
                     "--val-images", root / "val2017", "--eval-only", "--out", out], expect=2)
    assert_one_line_error(p, "image_info_test-dev2017.json", "needs --det-json")


def test_official_checkpoint_evaluates_on_bgr_input_by_itself(tiny, tmp_path):
    _, flags = tiny
    torch.manual_seed(0)
    model, _ = mrpose.build_model(mrpose.get_args(flags + SMALL))
    ours = model.state_dict()
    torch.save(ours, tmp_path / "ours.pth")
    deconv = {"deconv1.0.": "deconv_layers.0.", "deconv1.1.": "deconv_layers.1.",
              "deconv2.0.": "deconv_layers.3.", "deconv2.1.": "deconv_layers.4.",
              "deconv3.0.": "deconv_layers.6.", "deconv3.1.": "deconv_layers.7."}
    official = {}
    # pose_resnet's names: ResNet at the top level, one deconv_layers Sequential
    for k, v in ours.items():
        k = k.removeprefix("backbone.")
        official[next((new + k[len(old):] for old, new in deconv.items() if k.startswith(old)),
                      k)] = v
    torch.save(official, tmp_path / "pose_resnet.pth")
    p = run(flags + SMALL + ["--eval-only", "--no-flip-test", "--weights",
                             tmp_path / "pose_resnet.pth", "--out", tmp_path / "off"])
    assert "BGR input (official checkpoint)" in p.stdout
    run(flags + SMALL + ["--eval-only", "--no-flip-test", "--weights", tmp_path / "ours.pth",
                         "--bgr", "--out", tmp_path / "bgr"])
    run(flags + SMALL + ["--eval-only", "--no-flip-test", "--weights", tmp_path / "ours.pth",
                         "--out", tmp_path / "rgb"])
    assert (results_of(tmp_path / "off") == results_of(tmp_path / "bgr")
            != results_of(tmp_path / "rgb"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    _, flags = tiny
    out = tmp_path / "run"
    run(flags + SMALL + ["--epochs", "1", "--lr-steps", "100", "--out", out])
    before = (out / "checkpoint.pth").read_bytes()
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    state["final_layer.bias"][0] = float("nan")  # poisons the loss from the first iteration on
    torch.save(state, tmp_path / "nan.pth")
    p = run(flags + SMALL + ["--epochs", "1", "--lr-steps", "100", "--weights",
                             tmp_path / "nan.pth", "--out", out],
            expect=2)
    assert "non-finite loss" in p.stderr and "Traceback" not in p.stderr
    assert (out / "checkpoint.pth").read_bytes() == before


def test_bad_inputs_give_one_line_errors(tiny, tmp_path):
    root, flags = tiny
    p = run(["--data", "coco", "--pretrained", "none", "--data-root", tmp_path / "nowhere", "--out",
             tmp_path / "o"], expect=2)
    assert_one_line_error(p, tmp_path / "nowhere", "not found")
    # present: a missing file is refused first, before the layout
    (tmp_path / "a.json").write_text("{}")
    p = run(["--data", "coco", "--pretrained", "none", "--ann", tmp_path / "a.json", "--out",
             tmp_path / "o"], expect=2)
    assert_one_line_error(p, "/data/coco: data root not found (--data-root)")
    missing = tmp_path / "missing.json"
    p = run(["--data", "coco", "--val-ann", missing, "--val-images", root, "--eval-only", "--out",
             tmp_path / "o"],
            expect=2)
    assert_one_line_error(p, missing, "not found")
    # a checkpoint of another backbone
    run(flags + SMALL + ["--iters", "1", "--lr-steps", "9", "--no-flip-test", "--out",
                         tmp_path / "r18"])
    p = run(flags + ["--backbone", "resnet34", "--eval-only", "--weights",
                     tmp_path / "r18" / "checkpoint.pth", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, "checkpoint.pth", "does not fit")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    p = run(flags + SMALL + ["--eval-only", "--weights", junk, "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, junk, "not a readable")
    saved = tmp_path / "r18" / "checkpoint.pth"
    state = torch.load(saved, map_location="cpu", weights_only=True)["model"]
    torch.save(dict(state, **{"extra.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    p = run(flags + SMALL + ["--eval-only", "--weights", tmp_path / "extra.pth", "--out",
                             tmp_path / "o"], expect=2)
    assert_one_line_error(p, "extra.pth", "does not fit", "extra.weight")
    torch.save([1, 2], tmp_path / "list.pth")
    p = run(flags + SMALL + ["--eval-only", "--weights", tmp_path / "list.pth", "--out",
                             tmp_path / "o"], expect=2)
    assert_one_line_error(p, "list.pth", "not a model checkpoint")
    # --resume with another learning rate would silently keep the saved schedule
    p = run(flags + SMALL + ["--iters", "2", "--lr-steps", "9", "--lr", "5e-3", "--no-flip-test",
                             "--resume", "--out", tmp_path / "r18"], expect=2)
    assert_one_line_error(p, "checkpoint.pth", "--lr")


def test_corrupt_image_and_unlabeled_annotations(tiny, tmp_path):
    root, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    ann = json.loads((bad / "annotations" / "person_keypoints_train2017.json").read_text())
    victim = bad / "train2017" / ann["images"][0]["file_name"]
    victim.write_bytes(b"\xff\xd8 truncated jpeg")
    flags = ["--data", "coco", "--pretrained", "none", "--ann",
             bad / "annotations" / "person_keypoints_train2017.json", "--images", bad / "train2017",
             "--val-ann", bad / "annotations" / "person_keypoints_val2017.json", "--val-images",
             bad / "val2017"]
    p = run(flags + SMALL + ["--epochs", "1", "--lr-steps", "9", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, victim.name, "unreadable image")
    assert not (tmp_path / "o" / "checkpoint.pth").exists()
    for a in ann["annotations"]:
        a["keypoints"] = [0] * 51
        a["num_keypoints"] = 0
    empty = bad / "annotations" / "empty.json"
    empty.write_text(json.dumps(ann))
    flags[flags.index("--ann") + 1] = empty
    p = run(flags + SMALL + ["--epochs", "1", "--lr-steps", "9", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, empty, "no trainable person")


def test_loss_falls_on_real_coco_batches():
    if not (SHARED / "coco_mini").is_dir():
        pytest.skip("../shared/data not present")
    torch.manual_seed(0)
    coco = load_coco(str(SHARED / "coco_mini" / "annotations" / "person_keypoints_train2017.json"))
    records, _ = read_coco(coco, str(SHARED / "coco_mini" / "train2017"), 0.75)
    ds = TopDownDataset(records[:8], (64, 96), COCO_FLIP_PAIRS, COCO_UPPER, train=True)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    model, _ = mrpose.build_model(mrpose.get_args(["--data", "coco", "--backbone", "resnet18",
                                                   "--pretrained", "none"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target, weight = gaussian_targets(batch["joints"], batch["visible"], (64, 96), (16, 24))
    losses = []
    for _ in range(25):
        loss = joints_mse_loss(model(normalize(batch["image"])), target, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@needs_shared
def test_oracle_on_real_coco_and_mpii(tmp_path):
    coco = SHARED / "coco"
    p = run(["--data", "coco", "--val-ann", coco / "annotations" / "test_coco.json", "--val-images",
             coco / "images", "--eval-only", "--oracle", "--workers", "0", "--out", tmp_path / "c"])
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["AP"] >= 0.95, p.stdout
    mpii = SHARED / "mpii"
    run(["--data", "mpii", "--val-ann", mpii / "annot" / "test_mpii.json", "--val-images",
         mpii / "images", "--gt-mat", mpii / "annot" / "detections_our_format.mat", "--eval-only",
         "--oracle", "--workers", "0", "--out", tmp_path / "m"])
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["Mean"] >= 99
    # pred.mat in HRNet/SimpleBaseline's layout scores the same through eval.mpii
    from common.metrics import load_mpii_gt, match_mpii_gt, mpii_pckh
    from eval.mpii import load_preds
    gt = load_mpii_gt(str(mpii / "annot" / "detections_our_format.mat"))
    index = match_mpii_gt(json.loads((mpii / "annot" / "test_mpii.json").read_text()), gt)
    again = mpii_pckh(load_preds(str(tmp_path / "m" / "pred.mat")), gt, index)
    assert ({k: v for k, v in again.items()
             if k != "per_joint"} == {k: v for k, v in metrics.items() if k != "per_joint"})
