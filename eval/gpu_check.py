"""One command that proves a GPU machine: every script trains, resumes and evaluates on the demo
data.

    python -m eval.gpu_check                 # the GPUs of this machine: at most 8 minutes on one
    python -m eval.gpu_check --device cpu    # small, on the CPU (CI runs it: tests/test_speed.py)

Each of mrpose.py, icon.py, mscl.py and liftedcl.py trains --iters iterations with --amp bf16 (and
--channels-last, where the script has it), resumes once for as many again and is evaluated:
mrpose.py and icon.py by --eval-only on the saved checkpoint, the pretraining scripts by mrpose.py
fine-tuned from their backbone.pth. With two or more visible GPUs every script also trains and
resumes under torchrun over all of them (NCCL), each with its own BatchNorm rule (mrpose/mscl
SyncBatchNorm, icon per rank, liftedcl shuffle BN).

A line passes when the command ran (exit 0), its loss is finite, the resumed run continued from the
checkpoint to twice the iterations, and the metrics file was written; never on a speed. Beside it
one table: the resumed run's img/s (pairs/s for the pretraining scripts; the epoch's mean, warm-up
and data loading included), its peak memory (CUDA max allocated on rank 0, or the process's peak RSS
on the CPU) and the MFU on a GPU whose bf16 peak eval.bench knows. Exit 1 when a line fails.
"""
import argparse
import json
import math
import os
import resource
import runpy
import socket
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.utils import UserError, run_main, save_json
from eval.bench import device_name, format_table, peak_bf16_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mrpose", "icon", "mscl", "liftedcl")
# evaluated with --eval-only; the others through mrpose.py fine-tuned on their backbone
POSE = ("mrpose", "icon")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--iters", type=int, default=None,
                   help="iterations before the resume and after it "
                   "(default 30 on CUDA; 2 on the CPU, one epoch of its small set)")
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    p.add_argument("--no-ddp", dest="ddp", action="store_false",
                   help="skip the torchrun runs over all GPUs")
    p.add_argument("--out", default=os.path.join("runs", "gpu_check"))
    p.add_argument("--timeout", type=int, default=300, help="seconds one command may take")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device available")
    args.device = "cuda" if cuda else "cpu"
    args.iters = args.iters or (30 if cuda else 2)
    args.gpus = torch.cuda.device_count() if cuda else 0
    return args


def child(peak_file, script, argv):
    """Run `script` as its own __main__ (under torchrun: this rank's part), then write this
    process's peak memory in MiB next to its outputs, whether it succeeded or not."""
    sys.argv = [script] + argv
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux
        if int(os.environ.get("RANK", 0)) == 0:
            with open(peak_file, "w") as f:
                json.dump({"peak_mib": peak}, f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, script, argv, out, step, ranks=1):
    """(return code, stdout + stderr, seconds, peak MiB) of `script argv` through `child`, under
    torchrun over `ranks` processes when ranks > 1; the peak goes through OUT/peak-STEP.json."""
    os.makedirs(out, exist_ok=True)
    peak_file = os.path.join(out, f"peak-{step}.json")
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                "-m"] if ranks > 1 else ["-m"]
    cmd = ([sys.executable] + launcher + ["eval.gpu_check", "--child", peak_file,
                                          script] + [str(a) for a in argv])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                           timeout=args.timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {args.timeout} s\n{(e.stdout or b'')[-2000:]!r}"
    peak = None
    if os.path.isfile(peak_file):
        with open(peak_file) as f:
            peak = json.load(f)["peak_mib"]
    return rc, text, time.time() - t0, peak


def last_log(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else None


def saved_iteration(out):
    path = os.path.join(out, "checkpoint.pth")
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("iteration")


def data_flags(args, tiny):
    """Per script: the demo preset on a GPU; on the CPU a small demo set and small models (the
    tests' sizes)."""
    if args.device == "cuda":
        return {s: ["--data", "demo"] for s in SCRIPTS}
    coco = ["--data", "coco", "--ann", f"{tiny}/annotations/person_keypoints_train2017.json",
            "--images", f"{tiny}/train2017", "--val-ann",
            f"{tiny}/annotations/person_keypoints_val2017.json", "--val-images", f"{tiny}/val2017",
            "--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "8", "--workers",
            "0", "--head-channels", "32", "--no-flip-test", "--lr-steps", "1000"]
    folder = ["--data", "folder", "--images", f"{tiny}/train2017", "--backbone", "resnet18",
              "--crop-size", "32", "--batch-size", "8", "--workers", "0"]
    return {"mrpose": coco, "icon": coco + ["--embed-dim", "32", "--num-queries", "32",
                                            "--num-negatives", "64"],
            "mscl": folder, "liftedcl": folder + ["--moco-k", "16", "--prior-size", "200"]}


def fast_flags(script):
    """bf16 everywhere, channels_last where the script has the flag (the pose networks)."""
    return (["--amp", "bf16", "--print-freq", "1000"] + (["--channels-last"] if script in POSE
                                                         else []))


def train_flops(script, argv):
    """FLOPs of one training step per image (pair), counted by FlopCounterMode on a forward of the
    script's own model built from `argv`, x3 for the backward (eval.bench's rule); LiftedCL: 3x the
    query encoder plus one forward of the key encoder (no backward)."""
    import icon
    import liftedcl
    import mrpose
    import mscl
    mod = {"mrpose": mrpose, "icon": icon, "mscl": mscl, "liftedcl": liftedcl}[script]
    a = mod.get_args(argv)
    n = 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if script in POSE:
            model = mod.build_model(a)[0].eval()
            model(torch.zeros(n, 3, a.input_size[1], a.input_size[0]))
            factor = 3
        elif script == "mscl":
            model = mod.build_model(a).eval()
            model(torch.zeros(n, 3, a.crop_size, a.crop_size),
                  torch.zeros(n, 3, a.crop_size, a.crop_size))
            factor = 3
        else:
            model = liftedcl.LiftedCL(a.backbone, a.dim, a.moco_k, a.moco_m,
                                      a.moco_t).encoder_q.eval()
            model(torch.zeros(n, 3, a.crop_size, a.crop_size))
            factor = 4
    return factor * counter.get_total_flops() / n


def check(name, rc, text, ok, why):
    """One result line: PASS, or FAIL and the first reason (the command's last output lines when it
    failed)."""
    if rc != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return dict(check=name, ok=False, why=f"exit {rc}: {tail}")
    return dict(check=name, ok=bool(ok), why="" if ok else why)


def run_script_checks(args, script, flags, root, ranks):
    """train, resume (and eval) of one script; the lines and its throughput row."""
    tag = script if ranks == 1 else f"{script} DDP x{ranks}"
    out = os.path.join(root, script if ranks == 1 else f"{script}-ddp")
    n = args.iters
    # from scratch: nothing to download
    init = ["--pretrained", "none"] if script == "mrpose" else []
    argv = flags + init + fast_flags(script) + ["--device", args.device, "--out", out]
    lines = []
    rc, text, _, _ = run(args, f"{script}.py", argv + ["--iters", n], out, "train", ranks)
    log = last_log(out)
    lines.append(check(f"{tag}: train {n} iterations", rc, text,
                       log and math.isfinite(log["loss"]) and saved_iteration(out) == n,
                       f"no finite loss in log.jsonl or no checkpoint at iteration {n}"))
    if not lines[-1]["ok"]:
        return lines, None
    rc, text, seconds, peak = run(args, f"{script}.py", argv + ["--iters", 2 * n, "--resume"], out,
                                  "resume", ranks)
    log = last_log(out)
    lines.append(check(f"{tag}: resume to {2 * n}", rc, text,
                       "resumed from" in text and log and math.isfinite(log["loss"])
                       and saved_iteration(out) == 2 * n,
                       f"did not continue from iteration {n} to {2 * n} with a finite loss"))
    if not lines[-1]["ok"]:
        return lines, None
    unit = "img/s" if script in POSE else "pairs/s"
    row = dict(run=tag, unit=unit, rate=log.get("img_per_s", log.get("pairs_per_s")), peak_mib=peak,
               seconds=seconds, flops=train_flops(script, flags + init))
    if ranks > 1:
        return lines, row
    if script in POSE:
        eval_out = os.path.join(out, "eval")
        rc, text, _, _ = run(args, f"{script}.py",
                             flags + ["--device", args.device, "--eval-only", "--weights",
                                      os.path.join(out, "checkpoint.pth"), "--out", eval_out],
                             eval_out, "eval")
        what = f"{script}.py --eval-only"
    else:  # the pretrained backbone, fine-tuned and evaluated by mrpose.py
        eval_out = os.path.join(out, "transfer")
        pose = data_flags(args, os.path.join(root, "tiny"))["mrpose"] + fast_flags("mrpose")
        rc, text, _, _ = run(args, "mrpose.py",
                             pose + ["--pretrained", os.path.join(out, "backbone.pth"), "--device",
                                     args.device, "--iters", n, "--out", eval_out],
                             eval_out, "eval")
        what = "mrpose.py --pretrained backbone.pth"
    metrics = os.path.join(eval_out, "metrics.json")
    ok = os.path.isfile(metrics) and "AP" in json.load(open(metrics))
    lines.append(check(f"{tag}: evaluate ({what})", rc, text, ok, "no AP in metrics.json"))
    return lines, row


def main():
    args = get_args()
    if args.child:
        return child(*args.child[:2], args.child[2:])
    root = os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    name = device_name(torch.device(args.device))
    peak_flops = peak_bf16_flops(name) if args.device == "cuda" else None
    print(f"device: {name} ({args.gpus} GPU{'s' if args.gpus != 1 else ''})"
          if args.device == "cuda" else
          f"device: {name} (CPU, small models and a small demo set)")
    print(f"torch {torch.__version__}; {args.iters} iterations, resume to {2 * args.iters}; "
          f"outputs in {root}", flush=True)
    tiny = os.path.join(root, "tiny")
    if args.device == "cpu":
        from data.demo import make_demo
        make_demo(tiny, seed=1, n_train=16, n_val=4, workers=1)
    flags = data_flags(args, tiny)
    runs = [1] + ([args.gpus] if args.ddp and args.gpus >= 2 else [])
    lines, rows, t0 = [], [], time.time()
    for ranks in runs:
        for script in args.scripts:
            new, row = run_script_checks(args, script, flags[script], root, ranks)
            for line in new:
                print(f"{'PASS' if line['ok'] else 'FAIL'}  {line['check']}"
                      + (f"  ({line['why']})" if line["why"] else ""), flush=True)
            lines += new
            if row:
                row["mfu"] = (row["rate"] * row["flops"] / (peak_flops * ranks) if peak_flops
                              and row["rate"] else None)
                rows.append(row)
    print("\nthroughput of the resumed runs (the epoch's mean: warm-up and data loading included; "
          "not a benchmark, see eval.bench)")
    mem = "peak MiB (CUDA max allocated, rank 0)" if args.device == "cuda" else "peak MiB (RSS)"
    print(format_table([dict(r, gflops=r["flops"] / 1e9) for r in rows],
                       [("run", "run", "s"), ("rate", "rate", ".1f"), ("unit", "unit", "s"),
                        ("peak_mib", mem, ".0f"), ("gflops", "train GFLOP/item", ".2f"),
                        ("mfu", "MFU (bf16 peak)", ".2%")]))
    failed = sum(not line["ok"] for line in lines)
    save_json(os.path.join(root, "gpu_check.json"),
              dict(device=name, gpus=args.gpus, iters=args.iters, lines=lines, rows=rows,
                   seconds=time.time() - t0))
    print(f"\n{len(lines) - failed}/{len(lines)} checks passed in {time.time() - t0:.0f} s; "
          f"{os.path.join(root, 'gpu_check.json')}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
