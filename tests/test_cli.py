"""One line for every bad input and fault a new user meets: each test
feeds the bad input and checks the line names the file and the cause, with no traceback."""
import errno
import io
import json
import os
import sys
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch

import data
import icon
import liftedcl
import mrpose
import mscl
from common import backbone as backbone_module
from common.datasets import read_mpii
from common.metrics import coco_keypoint_eval
from common.utils import (UserError, atomic_write, check_resume_args, load_checkpoint,
                          save_checkpoint)
from data.demo import make_demo
from helpers import assert_one_line_error, run_script

SMALL = ["-a", "resnet18", "--input-size", "64", "96", "-b", "8", "-j", "0", "--print-freq", "1"]


def run_main_of(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py"] + [str(a) for a in argv])
    module.main()


def mpii_person(**drop):
    person = {"image": "a.jpg", "center": [50.0, 50.0], "scale": 0.5, "joints": [[10.0, 10.0]] * 16,
              "joints_vis": [1] * 16}
    return {k: v for k, v in person.items() if k not in drop}


def test_mpii_json_without_joints_vis_or_scale(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    for key in ("joints_vis", "scale"):
        ann = tmp_path / f"no_{key}.json"
        ann.write_text(json.dumps([mpii_person(), mpii_person(**{key: None})]))
        with pytest.raises(UserError, match=f"no_{key}.json: person 1 has no '{key}'"):
            # mrpose.py/icon.py --data mpii read it so
            read_mpii(str(ann), str(tmp_path / "images"), 0.75)
    # eval.mpii --ann: the matching reads joints and joints_vis
    import eval.mpii
    scipy.io.savemat(tmp_path / "gt.mat",
                     {"pos_gt_src": np.full((16, 2, 2), 11.0), "jnt_missing": np.zeros((16, 2)),
                      "headboxes_src": np.tile(np.array([[0, 0], [20, 20]], float)[..., None],
                                               (1, 1, 2))})
    (tmp_path / "preds.json").write_text(json.dumps([[[10.0, 10.0]] * 16] * 2))
    with pytest.raises(UserError, match="no_joints_vis.json: person 1 has no 'joints_vis'"):
        run_main_of(eval.mpii, ["--preds", tmp_path / "preds.json", "--gt-mat", tmp_path / "gt.mat",
                                "--ann", tmp_path / "no_joints_vis.json"], monkeypatch)


def test_pretrained_torchvision_without_network(monkeypatch):
    def offline(weights=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setitem(backbone_module.RESNETS, "resnet18", offline)
    with pytest.raises(UserError, match="--pretrained torchvision: cannot fetch the ImageNet "
                                        "resnet18 weights"):
        icon.build_model(icon.get_args(["--pretrained", "torchvision"]))
    model = liftedcl.LiftedCL("resnet34", 16, 64, 0.99, 0.2, False, False, True, 4, 1)
    with pytest.raises(UserError, match="--pretrained torchvision: cannot fetch the ImageNet "
                                        "resnet18 weights"):
        liftedcl.load_pretrained(model, "torchvision", "resnet18")


def test_icon_checkpoint_error_names_icons_flags(tmp_path, monkeypatch):
    pose = icon.build_model(icon.get_args(["-a", "resnet34"]))[0]
    torch.save({"model": pose.state_dict()}, tmp_path / "r34.pth")
    with pytest.raises(UserError) as e:
        run_main_of(icon, ["--eval-only", "--weights", tmp_path / "r34.pth", "--out",
                           tmp_path / "o"], monkeypatch)
    assert ("r34.pth: does not fit" in str(e.value) and "--backbone" in str(e.value)
            and "--arch" not in str(e.value))


def test_liftedcl_data_without_root_names_the_default_root_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path))
    for name in ("imagenet", "coco"):
        with pytest.raises(UserError, match=f"^{tmp_path / name}: data root not found "
                                            f"\\(--data-root\\)$"):
            run_main_of(liftedcl, ["--data", name, "--pretrained", "none", "--out",
                                   tmp_path / "o"], monkeypatch)


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([mpii_person()]))
    with pytest.raises(UserError, match="images: image folder is empty"):
        read_mpii(str(ann), str(tmp_path / "images"), 0.75)


def test_mscl_batch_messages_give_the_real_reason(tmp_path, monkeypatch):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    flags = ["--data", "folder", "--images", tmp_path, "-a", "resnet18", "-j", "0", "--out",
             tmp_path / "o"]
    with pytest.raises(UserError, match="--batch-size 8 is larger than the 3 training images"):
        run_main_of(mscl, flags + ["-b", "8"], monkeypatch)
    with pytest.raises(UserError, match="--batch-size 1 gives 1 image.* BatchNorm needs at least 2 "
                                        "per rank"):
        run_main_of(mscl, flags + ["-b", "1"], monkeypatch)


def test_non_torch_weights_file_gets_advice_the_user_can_follow(tmp_path):
    import argparse
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "pickled.pth")
    assert "argparse.Namespace" in str(e.value) and "weights_only" not in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_torchrun_prints_a_bad_argument_once(tmp_path):
    p = run_script("mscl.py", ["--data", "imagenet", "--data-root", tmp_path / "nowhere"], expect=1,
                   torchrun=True)
    ours = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert ours == [f"error: {tmp_path / 'nowhere'}: data root not found (--data-root)"], p.stderr
    assert "UserError" not in p.stderr  # no rank's traceback; torchrun's own failure block remains


def test_pycocotools_progress_lines_are_silenced(tmp_path, capsys):
    kpts = np.concatenate([np.stack([np.linspace(50, 110, 17), np.linspace(40, 160, 17)], 1),
                           np.full((17, 1), 2.0)], 1)
    gt = {"images": [{"id": 1, "width": 400, "height": 300}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4000.0,
                           "bbox": [50, 40, 60, 120], "num_keypoints": 17,
                           "keypoints": kpts.ravel().tolist()}],
          "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)],
                          "skeleton": []}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    capsys.readouterr()
    stats = coco_keypoint_eval(str(tmp_path / "gt.json"),
                               [{"image_id": 1, "category_id": 1, "score": 1.0,
                                 "keypoints": kpts.ravel().tolist()}])
    out = capsys.readouterr().out
    # the summary table stays
    assert stats["AP"] == pytest.approx(1.0) and "Average Precision" in out
    assert "Loading and preparing" not in out and "index created" not in out and "DONE" not in out


def test_full_disk_while_writing_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    class FullDisk(io.RawIOBase):  # the device fills after 1000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

    with pytest.raises(UserError) as e:
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(100000)}, FullDisk(f)))
    assert (str(e.value) == f"{path}: cannot write ({os.strerror(errno.ENOSPC)}); the previous "
                            f"file is unchanged")
    assert (path.read_bytes() == before
            and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"])


def test_resume_with_larger_iters_continues_inside_an_epoch(tmp_path):
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=24, n_val=4)
    flags = ["--data", "coco", "--pretrained", "none", "--ann",
             f"{root}/annotations/person_keypoints_train2017.json", "--images", f"{root}/train2017",
             "--val-ann", f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
             f"{root}/val2017", "--no-flip-test", "--out", tmp_path / "run"] + SMALL
    # 1 of the epoch's 3 iterations; the epoch counts as done
    run_script("mrpose.py", flags + ["--iters", "1"])
    run_script("mrpose.py", flags + ["--iters", "3", "--resume"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log] == [1, 3]
    p = run_script("mrpose.py", flags + ["--iters", "3", "--resume"], expect=2)
    assert_one_line_error(p, "checkpoint.pth", "the run is complete (3 of 3 iterations)")


@pytest.mark.parametrize("module", [mrpose, icon, mscl, liftedcl])
def test_resume_refuses_another_dataset_seed_or_labeled_set(module, tmp_path):
    """A `--data-seed 1` demo run resumed without it would go on with another generated dataset, a
    `--seed 1` run with other draws; another --data, --ann, --images or --labeled trains on other
    persons."""
    init = ["--pretrained", "none"] if module is liftedcl else []

    def check(saved_argv, argv, message):
        saved = vars(module.get_args(init + [str(a) for a in saved_argv]))
        args = module.get_args(init + [str(a) for a in argv])
        with pytest.raises(UserError, match=f"^ckpt: saved with {message}; resume with the same "
                                            f"settings or use another --out$"):
            check_resume_args("ckpt", saved, args, module.RESUME_KEYS)
        check_resume_args("ckpt", saved, module.get_args(init + [str(a) for a in saved_argv]),
                          module.RESUME_KEYS)  # the same command resumes

    check(["--seed", "1"], [], "--seed 1, this run has 0")
    check(["--data-seed", "1"], [], "--data-seed 1, this run has 0")
    if module in (mrpose, icon):
        args = module.get_args(["--data", "coco"])
        with pytest.raises(UserError, match="^ckpt: saved with --data demo, this run has coco;"):
            check_resume_args("ckpt", dict(vars(args), data="demo"), args, module.RESUME_KEYS)
        check(["--labeled", "8"], [], "--labeled 8, this run has None")
        coco = ["--data", "coco", "--data-root", tmp_path]
        check(coco + ["--ann", "a.json"], coco, "--ann a.json, this run has None")
        check(coco + ["--images", "a"], coco + ["--images", "b"], "--images a, this run has b")
    else:
        check(["--data", "folder", "--images", "a"], ["--data", "folder", "--images", "b"],
              "--images a, this run has b")
