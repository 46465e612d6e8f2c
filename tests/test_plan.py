"""The run plan (common/plan.py): every README reproduction command resolves through --dry-run, the
plan's schema and values, the help that shows them, the flags as the anchors spell them,
OUT/args.json."""
import argparse
import contextlib
import io
import json
import shlex
import sys

import pytest

import icon
import liftedcl
import mrpose
import mscl
from common import plan
from common.utils import UserError
from helpers import REPO

SCRIPTS = {"mrpose.py": mrpose, "mscl.py": mscl, "icon.py": icon, "liftedcl.py": liftedcl}
POSE = ("mrpose.py", "icon.py")


# ----------------------------------------------------------------------------------------------
# The README's commands: extractor and checker

def readme_commands(markdown):
    """(script, argv, world size, the line as written) of every command in the ```sh blocks whose
    first line is '# dry-run'; evaluation tools (python -m eval.X) are skipped. A line that is no
    command fails."""
    commands, block, lines = [], None, markdown.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if block is None:
            if stripped == "```sh" and i + 1 < len(lines) and lines[i + 1].strip() == "# dry-run":
                block = []
            continue
        if stripped.startswith("```"):
            commands += [parse_command(c) for c in join_continuations(block)]
            block = None
        else:
            block.append(line)
    return [c for c in commands if c is not None]


def join_continuations(lines):
    out, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def parse_command(line):
    tokens = shlex.split(line, comments=True)
    world = 1
    if tokens[:2] == ["python", "-m"] and tokens[2].startswith("eval."):
        return None
    if tokens[0] == "python":
        rest = tokens[1:]
    elif tokens[0] == "torchrun":
        rest = tokens[1:]
        while rest and rest[0].startswith("--"):
            opt = rest.pop(0)
            if opt.startswith("--nproc_per_node") or opt.startswith("--nproc-per-node"):
                world = int(opt.split("=", 1)[1] if "=" in opt else rest.pop(0))
    else:
        raise AssertionError(f"not a command of a # dry-run block: {line}")
    assert rest and rest[0] in SCRIPTS, f"unknown script in: {line}"
    return rest[0], rest[1:], world, line


def dry_run(script, argv, world, monkeypatch):
    """The script's plan for `argv` with torchrun's WORLD_SIZE, in-process, as --dry-run would print
    it; an AssertionError with argparse's or the script's own message if the command is refused."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = SCRIPTS[script].get_args(list(argv))
    except SystemExit:
        raise AssertionError(f"{script} {' '.join(argv)}: "
                             f"{err.getvalue().strip().splitlines()[-1]}") from None
    except UserError as e:
        raise AssertionError(f"{script} {' '.join(argv)}: {e}") from None
    return json.loads(json.dumps(SCRIPTS[script].run_plan(args)))


def test_readme_commands_resolve_through_dry_run(monkeypatch):
    readme = REPO / "README.md"
    commands = readme_commands(readme.read_text()) if readme.is_file() else []
    if not commands:
        pytest.skip("README.md has no ```sh block opened by '# dry-run' yet")
    failures = []
    for script, argv, world, line in commands:
        try:
            dry_run(script, argv, world, monkeypatch)
        except AssertionError as e:
            failures.append(f"{line}\n    -> {e}")
    assert not failures, "README commands refused:\n" + "\n".join(failures)


MARKDOWN = """
Text.

```sh
# dry-run
python mrpose.py --data coco --data-root /data/coco --arch mrfeanet2  # Table I
torchrun --nproc_per_node=4 mscl.py --data imagenet \\
    --data-root /data/imagenet -b 512
python -m eval.coco --gt x.json --results y.json
```

```sh
python mrpose.py --no-such-flag
```

```sh
# dry-run
torchrun --nproc_per_node 2 --master_port=29500 liftedcl.py --data coco --data-root /data/coco \\
    --pretrained /weights/moco.pth
```
"""


def test_extractor_and_checker_on_inline_markdown(monkeypatch):
    commands = readme_commands(MARKDOWN)
    assert [(s, a, w) for s, a, w, _ in commands] == [
        ("mrpose.py", ["--data", "coco", "--data-root", "/data/coco", "--arch", "mrfeanet2"], 1),
        ("mscl.py", ["--data", "imagenet", "--data-root", "/data/imagenet", "-b", "512"], 4),
        ("liftedcl.py", ["--data", "coco", "--data-root", "/data/coco", "--pretrained",
                         "/weights/moco.pth"], 2)]
    plans = [dry_run(s, a, w, monkeypatch) for s, a, w, _ in commands]
    assert (plans[0]["arch"] == "mrfeanet2" and plans[0]["epochs"] == 170
            and plans[0]["world_size"] == 1)
    assert (plans[1]["world_size"] == 4
            and plans[1]["lr_effective"] == pytest.approx(0.05 * 512 / 256))
    assert (plans[2]["world_size"] == 2 and plans[2]["bn_groups"] == 2
            and plans[2]["init"] == "file /weights/moco.pth")
    bad = MARKDOWN.replace("--arch mrfeanet2", "--arch mrfeanet2 --no-such-flag")
    with pytest.raises(AssertionError, match="--no-such-flag"):
        [dry_run(s, a, w, monkeypatch) for s, a, w, _ in readme_commands(bad)]
    bad = MARKDOWN.replace("--data imagenet", "--data cityscapes")
    with pytest.raises(AssertionError, match="cityscapes"):
        [dry_run(s, a, w, monkeypatch) for s, a, w, _ in readme_commands(bad)]
    with pytest.raises(AssertionError, match="not a command"):
        readme_commands(MARKDOWN.replace("python -m eval.coco", "cd /data && python -m eval.coco"))


# ----------------------------------------------------------------------------------------------
# The plan

def parser_dests(module, argv):
    """The dests of the script's parser (captured while get_args builds it)."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        seen["dests"] = {x.dest for x in self._actions if x.dest != "help"}
        return original(self, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", spy)
        module.get_args(argv)
    return seen["dests"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_plan_holds_every_dest_and_the_derived_entries(script, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = dry_run(script, [], 1, monkeypatch)
    missing = parser_dests(SCRIPTS[script], []) - set(p)
    assert not missing
    # presets applied
    assert None not in (p["backbone"], p["epochs"], p["lr"], p["batch_size"], p["workers"])
    assert ({"world_size", "lr_effective", "init", "augmentation"} <= set(p)
            and "law" in p["augmentation"])
    assert p["init"].startswith("scratch")  # every demo preset starts from scratch
    if script in POSE:
        assert set(p["eval"]) == {"boxes", "split", "flip_test"}


def test_plan_values_follow_presets_protocols_and_the_command_line(monkeypatch):
    p = dry_run("mrpose.py", ["--data", "coco", "-b", "32"], 1, monkeypatch)
    assert (p["batch_size"], p["lr"], p["epochs"], p["lr_steps"],
            p["input_size"]) == (32, 1e-3, 170, [120, 150], [192, 256])
    assert p["init"].startswith("torchvision ImageNet") and p["eval"] == {"boxes": "ground-truth "
                                                                                   "boxes",
                                                                          "split": "val2017",
                                                                          "flip_test": True}
    assert p["augmentation"]["scale_factor"] == 0.3 and p["augmentation"]["rot_factor"] == 40.0
    p = dry_run("mrpose.py", ["--protocol", "mscl-coco", "--semi", "none", "--det-json", "d.json"],
                1, monkeypatch)
    assert p["iters"] == 36000 and p["data"] == "coco" and p["eval"]["flip_test"] is False
    assert p["eval"]["boxes"].startswith("detections d.json")
    p = dry_run("icon.py", ["--data", "crowdpose", "--val-ann", "/c/crowdpose_val.json",
                            "--pretrained", "x.pth"], 1,
                monkeypatch)
    assert (p["eval"]["split"] == "crowdpose_val" and p["init"] == "file x.pth"
            and p["epochs"] == 220)
    # the lr after batch scaling, with the batch actually used (mscl rounds it down to the ranks)
    assert dry_run("mscl.py", ["--data", "imagenet", "-b", "512"], 3,
                   monkeypatch)["lr_effective"] == \
        pytest.approx(0.05 * 510 / 256)
    assert (dry_run("liftedcl.py", ["-b", "64"], 1,
                    monkeypatch)["lr_effective"] == pytest.approx(0.12 * 64 / 128))


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_one_json_plan_and_touches_nothing(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [script, "--data", "coco", "--data-root", "/no/such/root", "--out", str(out),
            "--dry-run"]
    if script != "mscl.py":
        argv += ["--pretrained", "/no/such/weights.pth"]
    monkeypatch.setattr(sys, "argv", argv)
    SCRIPTS[script].main()
    p = json.loads(capsys.readouterr().out)
    assert p["data_root"] == "/no/such/root" and p["out"] == str(out) and p["world_size"] == 1
    assert not out.exists()


def test_run_start_writes_args_json_and_checks_paths_first(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    args = mrpose.get_args(["--data", "coco", "--data-root", str(tmp_path), "--out", str(out), "-j",
                            "0"])
    assert plan.begin(args, mrpose.run_plan) is False
    assert (json.loads((out / "args.json").read_text())
            == json.loads(json.dumps(mrpose.run_plan(args))))
    args = mrpose.get_args(["--data", "coco", "--eval-only", "--data-root", str(tmp_path), "--out",
                            str(tmp_path / "e"), "-j", "0"])
    plan.begin(args, mrpose.run_plan)
    # evaluating leaves the trained run's plan alone
    assert not (tmp_path / "e" / "args.json").exists()
    args = mrpose.get_args(["--data", "coco", "--data-root", str(tmp_path / "none"), "--out",
                            str(tmp_path / "x")])
    with pytest.raises(UserError, match="none: data root not found"):
        plan.begin(args, mrpose.run_plan)
    assert not (tmp_path / "x").exists()
    # more workers than CPUs: capped, said once
    args = mrpose.get_args(["--data", "coco", "--data-root", str(tmp_path), "--out", str(out),
                            "-j", str(plan.cpus() + 3)])
    capsys.readouterr()
    plan.begin(args, mrpose.run_plan)
    assert args.workers == plan.cpus()
    assert capsys.readouterr().out.count("capped at") == 1


# ----------------------------------------------------------------------------------------------
# Help and flags

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_what_will_run(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit):
        SCRIPTS[script].get_args()
    text = capsys.readouterr().out
    assert ("(default: None)" not in text
            and "(default: True)" not in text.replace("--normalize-lifted", ""))
    for name in SCRIPTS[script].PRESETS:
        assert name in text.split("values of --data's presets")[1]
    actions = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a,
                   **k: actions.extend(self._actions) or
                   (_ for _ in ()).throw(SystemExit(0)))
        with pytest.raises(SystemExit):
            SCRIPTS[script].get_args([])
    assert [a.option_strings for a in actions if not (a.help or "").strip()] == []
    # --no-flip reads as a switch-off
    assert "on by default" in text or script in ("mscl.py", "liftedcl.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_as_the_anchors_spell_them(script, monkeypatch, tmp_path):
    get = SCRIPTS[script].get_args
    args = get(["-a", "resnet34", "-b", "32", "-j", "0", "--out", str(tmp_path)])
    assert (args.backbone, args.batch_size, args.workers) == ("resnet34", 32, 0)
    assert args.resume is None
    assert get(["--resume", "--out", str(tmp_path)]).resume == str(tmp_path / "checkpoint.pth")
    assert get(["--resume", "x.pth", "--out", str(tmp_path)]).resume == "x.pth"
    with pytest.raises(UserError, match="--iters 0"):
        get(["--iters", "0"])
    if script in ("mscl.py", "liftedcl.py"):
        assert get(["--weight-decay", "3e-5"]).wd == get(["--wd", "3e-5"]).wd == 3e-5
        assert get(["--summary"]).summary
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            get(["--arch", "resnet18"])  # --arch is mrpose.py's model, nothing else
