"""A run reads the data and the device its command names, or stops with one line: --device cuda
without CUDA, a dataset path flag that --data does not read, and each dataset preset's default
root data/<name> in the repository (git-ignored, usually a link)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import icon
import liftedcl
import mrpose
import mscl
from common import dist, plan
from common.topdown import data_paths
from common.utils import UserError
from data.demo import make_demo
from helpers import REPO, assert_one_line_error, run_script

SCRIPTS = {"mrpose.py": mrpose, "icon.py": icon, "mscl.py": mscl, "liftedcl.py": liftedcl}
POSE = ("mrpose.py", "icon.py")
# the dataset path flags of each script, and its dataset presets
PATHS = {"mrpose.py": ["--data-root", "--ann", "--images", "--val-ann", "--val-images"],
         "icon.py": ["--data-root", "--ann", "--images", "--val-ann", "--val-images"],
         "mscl.py": ["--data-root", "--images"], "liftedcl.py": ["--data-root", "--images"]}
DATASETS = {"mrpose.py": ["coco", "mpii"], "icon.py": ["coco", "mpii", "crowdpose"],
            "mscl.py": ["imagenet", "coco"], "liftedcl.py": ["coco", "imagenet"]}


@pytest.fixture
def no_links(tmp_path, monkeypatch):
    """data/<name> in an empty folder: the tests do not depend on the links of this checkout."""
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "repo-data"))


def get_args(script, argv):
    argv = list(argv) + (["--pretrained", "none"] if script == "liftedcl.py" else [])
    return SCRIPTS[script].get_args([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------
# --device

def test_device_cuda_without_cuda_is_refused_and_auto_says_it_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--device cuda: no CUDA device available \(.*\); "
                                        r"--device cpu runs on the CPU$"):
        dist.setup("cuda")
    assert dist.setup("auto")[2] == torch.device("cpu")
    assert capsys.readouterr().out == "--device auto: no CUDA device, running on the CPU\n"
    assert dist.setup("cpu")[2] == torch.device("cpu") and capsys.readouterr().out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_run_stops_with_one_line(tmp_path):
    demo = make_demo(str(tmp_path / "demo"), seed=1, n_train=8, n_val=2)
    p = run_script("mscl.py", ["--data", "folder", "--images", f"{demo}/train2017", "-a",
                               "resnet18", "-j", "0", "--device", "cuda", "--out",
                               tmp_path / "o"], expect=2)
    assert_one_line_error(p, "--device cuda: no CUDA device available")


# ----------------------------------------------------------------------------------------------
# A path flag that --data does not read is refused

@pytest.mark.parametrize("script", SCRIPTS)
def test_demo_refuses_every_dataset_path_flag(script, tmp_path):
    for flag in PATHS[script]:
        for argv in ([flag, tmp_path], ["--data", "demo", flag, tmp_path]):
            with pytest.raises(UserError) as e:
                get_args(script, argv + ["--dry-run"])
            assert str(e.value) == (f"{flag} {tmp_path}: --data demo generates its data and reads "
                                    f"no dataset path; {flag} is read by --data "
                                    + "|".join(p for p in SCRIPTS[script].PRESETS if p != "demo"
                                               and (p != "folder" or flag == "--images")))


@pytest.mark.parametrize("script", ["mscl.py", "liftedcl.py"])
def test_folder_reads_images_alone(script, tmp_path):
    with pytest.raises(UserError, match=f"^--data-root {tmp_path}: --data folder does not read "
                                        f"--data-root; --data-root is read by --data "):
        get_args(script, ["--data", "folder", "--images", tmp_path, "--data-root", tmp_path])
    with pytest.raises(UserError, match="^--data folder needs --images DIR$"):
        get_args(script, ["--data", "folder", "--dry-run"])
    assert get_args(script, ["--data", "folder", "--images", tmp_path]).data_root is None


@pytest.mark.parametrize("script", POSE)
def test_gt_mat_is_mpii_only(script, tmp_path):
    with pytest.raises(UserError, match="^--gt-mat g.mat: --data coco does not read --gt-mat; "
                                        "--gt-mat is read by --data mpii$"):
        get_args(script, ["--data", "coco", "--gt-mat", "g.mat"])
    assert get_args(script, ["--data", "mpii", "--gt-mat", "g.mat"]).gt_mat == "g.mat"


def test_demo_dry_run_of_the_issues_command_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mrpose.py", "--data-root", "/data/coco", "--arch",
                                      "mrfeanet2", "--dry-run"])
    with pytest.raises(UserError, match="--data-root /data/coco: --data demo"):
        mrpose.main()
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------
# A dataset's root: --data-root or data/<name>, supplying each path not given

@pytest.mark.parametrize("script", SCRIPTS)
def test_default_root_is_data_name_in_the_repository(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the working directory's
    for name in DATASETS[script]:
        assert get_args(script, ["--data", name]).data_root == str(REPO / "data" / name)
        assert get_args(script, ["--data", name, "--data-root", "/d"]).data_root == "/d"


@pytest.mark.parametrize("script", POSE)
def test_root_supplies_each_path_not_given_and_explicit_paths_win(script, tmp_path, no_links):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    args = get_args(script, ["--data", "coco", "--data-root", root, "--ann", "a.json",
                             "--val-images", "v"])
    assert data_paths(args) == dict(train_ann="a.json", train_images=str(root / "train2017"),
                                    val_ann=str(root / "annotations" /
                                                "person_keypoints_val2017.json"),
                                    val_images="v", gt_mat=None)
    # every path the run reads is given: no root is needed, none is checked
    given = ["--data", "coco", "--ann", "a", "--images", "i", "--val-ann", "v", "--val-images", "w"]
    assert get_args(script, given).data_root is None
    assert get_args(script, given[:2] + given[6:] + ["--eval-only"]).data_root is None
    assert get_args(script, given[:8]).data_root == os.path.join(data.DATA_DIR, "coco")
    mpii = get_args(script, ["--data", "mpii", "--eval-only", "--val-ann", "v", "--val-images",
                             "w"])
    assert mpii.data_root == os.path.join(data.DATA_DIR, "mpii")  # gt_valid.mat from the root
    assert get_args(script, ["--data", "coco", "--summary"]).data_root is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_default_root_is_one_line_at_the_start_not_in_dry_run_or_summary(
        script, tmp_path, capsys, no_links):
    data_name = DATASETS[script][-1]
    args = get_args(script, ["--data", data_name, "--out", tmp_path / "o", "-j", "0"])
    missing = os.path.join(data.DATA_DIR, data_name)
    with pytest.raises(UserError, match=f"^{missing}: data root not found \\(--data-root\\)$"):
        plan.begin(args, SCRIPTS[script].run_plan)
    assert not (tmp_path / "o").exists()
    args = get_args(script, ["--data", data_name, "--dry-run"])
    assert plan.begin(args, SCRIPTS[script].run_plan)
    assert json.loads(capsys.readouterr().out)["data_root"] == missing
    args = get_args(script, ["--data", data_name, "--summary", "--out", tmp_path / "s"])
    assert args.data_root is None and plan.begin(args, SCRIPTS[script].run_plan,
                                                 lambda args: print("summary")) is not False


def test_liftedcl_dry_run_needs_no_data_root(monkeypatch, capsys, no_links):
    monkeypatch.setattr(sys, "argv", ["liftedcl.py", "--data", "coco", "--pretrained", "none",
                                      "--dry-run"])
    liftedcl.main()
    assert json.loads(capsys.readouterr().out)["data_root"] == os.path.join(data.DATA_DIR, "coco")


def test_a_link_in_data_is_the_default_root(tmp_path, no_links):
    """`ln -s /path/to/imagenet data/imagenet`, then `mscl.py --data imagenet` reads it."""
    from PIL import Image
    (tmp_path / "imagenet" / "train" / "n0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "train" / "n0" / "a.JPEG")
    os.makedirs(data.DATA_DIR)
    os.symlink(tmp_path / "imagenet", os.path.join(data.DATA_DIR, "imagenet"))
    args = get_args("mscl.py", ["--data", "imagenet", "--out", tmp_path / "o"])
    assert plan.begin(args, mscl.run_plan) is False  # the root is found
    train = os.path.join(data.DATA_DIR, "imagenet", "train")
    assert mscl.image_folder(args) == train
    assert liftedcl.training_items(get_args("liftedcl.py", ["--data", "imagenet"])) == [
        os.path.join(train, "n0", "a.JPEG")]


def test_dataset_links_in_data_are_git_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["data/coco", "data/mpii", "data/crowdpose", "data/imagenet", "data/cache/demo-s0"]
    ignored = subprocess.run(["git", "check-ignore"] + names, cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert ignored == names
    tracked = subprocess.run(["git", "check-ignore", "data/README.md", "data/demo.py"], cwd=REPO,
                             capture_output=True, text=True).stdout
    assert tracked == ""
