"""Does a change leave every number alone? Runs short named commands of the four scripts and
compares two sets of their outputs: every checkpoint tensor `torch.equal`, every other checkpoint
entry equal (differing `args` keys are listed, not failed), `log.jsonl` equal on the keys both
runs log apart from timings, and the JSON outputs equal.

    python -m eval.same run OUT_A          # on the code before the change
    python -m eval.same run OUT_B          # on the code after it
    python -m eval.same compare OUT_A OUT_B

Each command crosses at least one save and, for the pose scripts, one evaluation (flip test on),
in fp32 on one thread, on a small generated set: a few minutes in all on a 2-core CPU.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# keys of log.jsonl that are measurements of time, not results
TIMING = ("_per_s", "time", "seconds", "sec", "eta", "wall", "speed")

POSE = ["--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers", "0",
        "--pretrained", "none", "--print-freq", "1", "--eval-every", "1"]
ICON = ["--head-channels", "32", "--embed-dim", "32", "--num-queries", "16", "--num-negatives",
        "32"]
SSL = ["--backbone", "resnet18", "--crop-size", "32", "--batch-size", "8", "--workers", "0",
       "--print-freq", "1", "--epochs", "2"]


def commands(data):
    """name -> (script, arguments), on the generated set under `data`."""
    coco = ["--data", "coco", "--ann", f"{data}/annotations/person_keypoints_train2017.json",
            "--images", f"{data}/train2017", "--val-ann",
            f"{data}/annotations/person_keypoints_val2017.json", "--val-images", f"{data}/val2017"]
    folder = ["--data", "folder", "--images", f"{data}/train2017"]
    return {
        "mrpose": ("mrpose.py", coco + POSE + ["--iters", "4", "--lr-steps", "3"]),
        "mrpose-semi": ("mrpose.py", coco + POSE + ["--iters", "3", "--lr-steps", "2", "--semi",
                                                    "dual", "--labeled", "8"]),
        "icon": ("icon.py", coco + POSE + ICON + ["--iters", "4", "--lr-steps", "3"]),
        "icon-semi": ("icon.py", coco + POSE + ICON + ["--iters", "3", "--lr-steps", "2",
                                                       "--semi", "dual", "--labeled", "8"]),
        "mscl": ("mscl.py", folder + SSL),
        "liftedcl": ("liftedcl.py", folder + SSL + ["--moco-k", "16", "--prior-size", "200"]),
    }


def run(out, names):
    from data.demo import make_demo
    out = Path(out).resolve()
    data = out / "data"
    if not data.is_dir():
        make_demo(str(data), seed=1, n_train=24, n_val=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for name, (script, argv) in commands(data).items():
        if names and name not in names:
            continue
        cmd = [sys.executable, script] + argv + ["--amp", "none", "--out", str(out / name)]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        (out / f"{name}.stdout").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            sys.exit(f"error: {name}: exit {p.returncode}\n{p.stderr[-2000:]}")


def diff(a, b, where, problems, args_keys, roots=("", "")):
    """Append to `problems` every way in which the nested objects `a` and `b` differ; in `args`,
    the two output folders' paths count as equal."""
    if where.endswith("['args']") and isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            x, y = (str(d.get(k, "<absent>")).replace(r, "OUT") for d, r in ((a, roots[0]),
                                                                            (b, roots[1])))
            if x != y:
                args_keys.add(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
        return
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
            problems.append(f"{where}: tensors differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                problems.append(f"{where}[{k!r}]: only in {'B' if k not in a else 'A'}")
            else:
                diff(a[k], b[k], f"{where}[{k!r}]", problems, args_keys, roots)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{where}[{i}]", problems, args_keys, roots)
    elif a != b:
        problems.append(f"{where}: {a!r} != {b!r}")


def timing(key):
    return any(t in key for t in TIMING)


def compare_logs(a, b, problems, dropped):
    la = [json.loads(x) for x in a.read_text().splitlines()]
    lb = [json.loads(x) for x in b.read_text().splitlines()]
    if len(la) != len(lb):
        problems.append(f"{a.name}: {len(la)} entries != {len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb)):
        dropped.update(f"{k} (only in {'A' if k in x else 'B'})" for k in set(x) ^ set(y))
        for k in set(x) & set(y):
            if not timing(k):
                diff(x[k], y[k], f"{a.name}[{i}][{k!r}]", problems, set())


def compare(a, b):
    a, b = Path(a), Path(b)
    failed = False
    for run_a in sorted(p for p in a.iterdir() if p.is_dir() and p.name != "data"):
        run_b = b / run_a.name
        problems, args_keys, dropped = [], set(), set()
        for f in sorted(run_a.iterdir()):
            g = run_b / f.name
            if not g.exists():
                problems.append(f"{f.name}: only in A")
            elif f.suffix == ".pth":
                load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
                diff(load(f), load(g), f.name, problems, args_keys, (str(a), str(b)))
            elif f.name == "log.jsonl":
                compare_logs(f, g, problems, dropped)
            elif f.suffix == ".json" and f.name != "args.json":
                diff(json.loads(f.read_text()), json.loads(g.read_text()), f.name, problems, set())
        status = "FAIL" if problems else "same"
        print(f"{run_a.name}: {status}")
        for p in problems:
            print(f"  {p}")
        for k in sorted(args_keys):
            print(f"  args differ (not a failure): {k}")
        for k in sorted(dropped):
            print(f"  log key not in both (not a failure): {k}")
        failed |= bool(problems)
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the named commands into OUT/<name>")
    r.add_argument("out")
    r.add_argument("names", nargs="*", help="a subset of: " + ", ".join(commands("D")))
    c = sub.add_parser("compare", help="compare two folders written by `run`")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.names)
    else:
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
