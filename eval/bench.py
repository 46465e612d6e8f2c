"""Throughput of the shipped code on the current device: pose training, data pipeline, evaluation,
pretraining.

    python -m eval.bench                                 # CPU: a few minutes on 2 cores
    python -m eval.bench --device cuda --out bench.json  # GPU: the five heads on ResNet-50, MFU
    python -m eval.bench --quick
        # smoke test: ResNet-18 only, < 1 min on a CPU
    python -m eval.bench --icon-backbones
        # without the ICON section (6: on by default)

1. Training: the step of mrpose.py's loop (forward, gaussian_targets on the device, joints MSE,
   Adam) on models built by mrpose.build_model at the paper's COCO input 256x192, 17 joints.
   Each (arch, backbone, mode) runs in a fresh process, so its peak memory is its own. Rows
   "+compile" train the model under torch.compile as `--compile` does (--no-compile skips them).
2. Data: samples/s of one worker on real COCO images and boxes: TopDownDataset with the COCO
   preset's augmentation plus batched gaussian_targets.
3. Evaluation: img/s of common.topdown.predict's inner loop (forward, flip test, decode,
back-projection).
4. MSCL pretraining (both --fusion orders) against SimSiam in the same code, pairs/s.
5. LiftedCL pretraining (encoder + discriminator step) against MoCo v2, its degenerate setting.
6. ICON: icon.py's training step (Eq. (5), hard sampling) next to the same step at λp = 0, batch 8.
7. Semi-supervised: mrpose.py --semi dual's step (common.semi.ConsistencyTraining: two networks,
   each on labeled, easy and hard views, the hard view warped on the device) next to two
   supervised steps of the same two networks on the labeled batch alone.

It only measures and prints; nothing here asserts a speed.
"""
import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import time

import numpy as np
import torch
from torch.utils.data import default_collate

import mrpose
from common.datasets import COCO_FLIP_PAIRS, COCO_UPPER, TopDownDataset, load_coco, read_coco
from common.heatmap import decode_heatmaps, flip_back, gaussian_targets
from common.topdown import to_memory_format
from common.transforms import heatmap_to_image, normalize
from common.utils import UserError, autocast, compile_model, native_bf16, run_main, save_json

ALL_ARCHS = ["simplebaseline", "mrheatnet1", "mrheatnet2", "mrfeanet1", "mrfeanet2"]
# CPU default: the baseline and the paper's best head on ResNet-50, and the baseline on ResNet-18
CPU_PAIRS = [("simplebaseline", "resnet50"), ("mrfeanet2", "resnet50"),
             ("simplebaseline", "resnet18")]
# mode -> mrpose.py flags; CPU shows whether channels_last alone helps, CUDA the fast training
# setting; a "+compile" mode is the mode without it under torch.compile (the warm-up steps compile,
# the timed ones do not)
MODES = {"fp32": [], "fp32+compile": ["--compile"], "channels_last": ["--channels-last"],
         "amp-bf16": ["--amp", "bf16"],
         "amp-bf16+channels_last": ["--amp", "bf16", "--channels-last"],
         "amp-bf16+channels_last+compile": ["--amp", "bf16", "--channels-last", "--compile"]}
# dense bf16 peak (no sparsity) for the MFU; H100 SXM and H200 share the same tensor cores
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SHARED_COCO = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data",
    "coco_mini")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--archs", nargs="+", choices=ALL_ARCHS, default=None,
                   help="default: all five on CUDA; simplebaseline mrfeanet2 on the CPU")
    p.add_argument("--backbones", nargs="+", default=None,
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                   help="default resnet50 (CPU: plus simplebaseline-resnet18); the first one is "
                        "also the evaluation model")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 8 on the CPU")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default 50 on CUDA, 5 on the CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations first (default 10 on CUDA, 2 on the CPU)")
    p.add_argument("--samples", type=int, default=None,
                   help="data pipeline samples per implementation (default 256)")
    p.add_argument("--coco-root", default=SHARED_COCO,
                   help="COCO folder with annotations/person_keypoints_train2017.json and "
                        "train2017/")
    p.add_argument("--mscl-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the MSCL-vs-SimSiam pretraining section (default 8 64 on "
                        "CUDA, 8 on the CPU; none: skip it)")
    p.add_argument("--liftedcl-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the LiftedCL-vs-MoCo v2 pretraining section (default 8 64 "
                        "on CUDA, 8 on the CPU; none: skip it)")
    p.add_argument("--icon-backbones", nargs="*", default=None,
                   choices=["resnet18", "resnet50", "hrnet_w32", "hrnet_w48"],
                   help="ICON section: training step with and without the contrast (default "
                        "resnet50 hrnet_w32; none: skip it)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the training rows under torch.compile (they compile for a minute or "
                        "more on a CPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts, batch 2, ResNet-18 only (smoke test)")
    p.add_argument("--out", default=None, help="also write every table as JSON here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device available")
    args.device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        args.archs, args.backbones = (args.archs or ["simplebaseline"], args.backbones
                                      or ["resnet18"])
        args.batch_size = args.batch_size or 2
        args.mscl_batches = []
        args.liftedcl_batches = []
        args.icon_backbones = [] if args.icon_backbones is None else args.icon_backbones
    if args.icon_backbones is None:
        args.icon_backbones = ["resnet50", "hrnet_w32"]
    if args.archs is None and args.backbones is None and not cuda:
        args.pairs = CPU_PAIRS
    else:
        archs = args.archs or (ALL_ARCHS if cuda else ["simplebaseline", "mrfeanet2"])
        args.pairs = [(a, b) for b in (args.backbones or ["resnet50"]) for a in archs]
    args.eval_backbone = (args.backbones or ["resnet50"])[0]
    bf16 = cuda or native_bf16(torch.device("cpu"))
    args.modes = ["fp32", "amp-bf16+channels_last"] if cuda else \
        ["fp32", "channels_last"] + (["amp-bf16", "amp-bf16+channels_last"] if bf16 else [])
    if args.quick:  # the smoke test: each kind of row once (compiling is most of its time)
        args.modes = [m for m in args.modes if m in ("fp32", "amp-bf16+channels_last")]
    # fp32 and the bf16 mode, each compiled (on a CPU without native bf16, and --quick: fp32 only)
    if args.compile:
        args.modes += (["fp32+compile"] + (["amp-bf16+channels_last+compile"] if bf16
                                           and not args.quick else []))
    args.batch_size = args.batch_size or (32 if cuda else 8)
    if args.mscl_batches is None:
        args.mscl_batches = [8, 64] if cuda else [8]
    if args.liftedcl_batches is None:
        args.liftedcl_batches = [8, 64] if cuda else [8]
    args.iters = args.iters or (1 if args.quick else 50 if cuda else 5)
    args.warmup = (args.warmup if args.warmup is not None
                   else (1 if args.quick else 10 if cuda else 2))
    args.samples = args.samples or (16 if args.quick else 256)
    args.threads = torch.get_num_threads()
    return args


def mrpose_args(arch, backbone, batch_size, mode):
    """mrpose.py's own arguments for the COCO preset: 192x256 input, 48x64 heatmaps, 17 joints."""
    return mrpose.get_args(["--data", "coco", "--pretrained", "none", "--arch", arch, "--backbone",
                            backbone, "--batch-size", str(batch_size)] + MODES[mode])


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def peak_bf16_flops(name):
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, cfg, device):
    """Seconds per call of `step` over cfg["iters"] calls after cfg["warmup"] untimed ones, the peak
    memory in MiB (CUDA: max allocated; CPU: growth of this process's RSS high-water mark) and the
    last call's return."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(cfg["warmup"]):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(cfg["iters"]):
        out = step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / cfg["iters"]
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2 ** 10)
    return dt, peak, out


def synthetic_batch(batch_size, args, device, seed=0):
    """A loader-like CPU batch (pinned on CUDA, as mrpose's loader): uint8 images, joints inside the
    crop, about 80% of the joints labeled."""
    g = torch.Generator().manual_seed(seed)
    w, h = args.input_size
    batch = {"image": torch.randint(0, 256, (batch_size, 3, h, w), generator=g, dtype=torch.uint8),
             "joints": torch.rand(batch_size, args.num_joints, 2,
                                  generator=g) * torch.tensor([w, h]),
             "visible": (torch.rand(batch_size, args.num_joints, generator=g) < 0.8).float(),
             "center": torch.full((batch_size, 2), 100.0),
             "scale": torch.full((batch_size, 2), 200.0)}
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def forward_flops(model, x):
    """FLOPs of one forward pass over x, counted by torch's FlopCounterMode on one image (linear in
    batch)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    model.train()
    return counter.get_total_flops() * x.shape[0]


# ----------------------------------------------------------------------------------------------
# 1. Training throughput

def train_step(model, optimizer, scheduler, scaler, batch, args, device):
    """One iteration of mrpose.train: mrpose.train_step, then its optimiser step line for line."""
    loss = mrpose.train_step(model, None, batch, args, device, 0)[0]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def train_config(cfg):
    """Time one (arch, backbone, mode); runs in its own process so peak memory is this config's."""
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    args = mrpose_args(cfg["arch"], cfg["backbone"], cfg["batch_size"], cfg["mode"])
    model = mrpose.build_model(args)[0].to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10 ** 9], gamma=0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    batch = synthetic_batch(cfg["batch_size"], args, device)
    # fwd + 2x bwd
    flops = 3 * forward_flops(model, to_memory_format(normalize(batch["image"].to(device)), args))
    trained = compile_model(model, args.compile)  # as mrpose.main wraps it

    dt, peak, loss = time_steps(lambda: train_step(trained, optimizer, scheduler, scaler, batch,
                                                   args, device),
                                cfg, device)
    return dict(arch=cfg["arch"], backbone=cfg["backbone"], mode=cfg["mode"],
                batch=cfg["batch_size"], img_per_s=cfg["batch_size"] / dt, ms_per_iter=dt * 1e3,
                peak_mib=peak, step_tflop=flops / 1e12, tflop_per_s=flops / dt / 1e12,
                loss=float(loss))


def bench_training(args, peak_flops):
    rows = []
    # fresh process: CUDA-safe, and its own RSS high-water mark
    spawn = multiprocessing.get_context("spawn")
    for arch, backbone in args.pairs:
        for mode in args.modes:
            cfg = dict(arch=arch, backbone=backbone, mode=mode, device=args.device.type,
                       batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                       threads=args.threads)
            with spawn.Pool(1) as pool:
                row = pool.apply(train_config, (cfg,))
            if args.device.type == "cuda":
                row["mfu"] = row["tflop_per_s"] * 1e12 / peak_flops if peak_flops else None
            rows.append(row)
            print(f"  train {arch} {backbone} {mode}: {row['img_per_s']:.1f} img/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Data pipeline: what one loader worker serves, on real COCO images and boxes

def time_pipeline(load_sample, batch_step, n, batch_size):
    """Seconds for n samples in one process: (loading + collating, which a loader worker does; the
    per-batch step on the training device: normalisation and targets)."""
    t_load = t_step = 0.0
    for start in range(0, n, batch_size):
        t0 = time.perf_counter()
        batch = default_collate([load_sample(i) for i in range(start, min(n, start + batch_size))])
        t1 = time.perf_counter()
        batch_step(batch)
        t_load, t_step = t_load + t1 - t0, t_step + time.perf_counter() - t1
    return t_load, t_step


def bench_data(args):
    ann = os.path.join(args.coco_root, "annotations", "person_keypoints_train2017.json")
    images = os.path.join(args.coco_root, "train2017")
    if not os.path.isfile(ann):
        return [], f"skipped: no COCO annotations at {ann} (give --coco-root)"
    coco_args = mrpose_args("simplebaseline", "resnet18", args.batch_size, "fp32")
    aspect = coco_args.input_size[0] / coco_args.input_size[1]
    records = read_coco(load_coco(ann), images, aspect)[0]
    for path in {r["image"] for r in records}:  # start from a warm page cache
        with open(path, "rb") as f:
            f.read()
    ours = TopDownDataset(records, coco_args.input_size, COCO_FLIP_PAIRS, COCO_UPPER, train=True,
                          scale_factor=coco_args.scale_factor, rot_factor=coco_args.rot_factor,
                          half_body_prob=0.3)

    def sample(i):
        ours.set_epoch(i // len(ours))  # cycling the records draws fresh augmentations each pass
        return ours[i % len(ours)]

    def batch_step(batch):  # what mrpose does per batch on the training device
        return normalize(batch["image"]), gaussian_targets(batch["joints"], batch["visible"],
                                                           coco_args.input_size,
                                                           coco_args.heatmap_size, coco_args.sigma)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    t_load, t_step = time_pipeline(sample, batch_step, args.samples, args.batch_size)
    torch.set_num_threads(threads)
    rows = [dict(pipeline="TopDownDataset + batched normalize, gaussian_targets",
                 samples=args.samples, samples_per_s=args.samples / t_load,
                 ms_per_sample=t_load / args.samples * 1e3,
                 step_ms_per_sample=t_step / args.samples * 1e3,
                 total_ms_per_sample=(t_load + t_step) / args.samples * 1e3)]
    return rows, f"{len(records)} persons in {len({r['image'] for r in records})} images of {ann}"


# ----------------------------------------------------------------------------------------------
# 3. Evaluation throughput

@torch.no_grad()
def predict_step(model, batch, args, device):
    """The body of common.topdown.predict's loop for one batch (model already in eval mode)."""
    x = normalize(batch["image"].to(device, non_blocking=True))
    with autocast(args, device):
        heat = model(to_memory_format(x, args)).float()
        if args.flip_test:
            flipped = flip_back(model(to_memory_format(x.flip(3), args)).float(), COCO_FLIP_PAIRS)
            flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
            heat = (heat + flipped) * 0.5
    coords, conf = decode_heatmaps(heat.cpu())  # the copy to the host synchronises CUDA
    return heatmap_to_image(coords, batch["center"], batch["scale"], args.heatmap_size), conf


def bench_eval(args):
    rows = []
    modes = ["fp32"] if args.device.type == "cpu" else args.modes
    for mode in modes:
        margs = mrpose_args("simplebaseline", args.eval_backbone, args.batch_size, mode)
        torch.manual_seed(0)
        model = mrpose.build_model(margs)[0].to(args.device).eval()
        if margs.channels_last:
            model.to(memory_format=torch.channels_last)
        batch = synthetic_batch(args.batch_size, margs, args.device)
        for _ in range(args.warmup):
            predict_step(model, batch, margs, args.device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            predict_step(model, batch, margs, args.device)
        dt = (time.perf_counter() - t0) / args.iters
        rows.append(dict(arch="simplebaseline", backbone=args.eval_backbone, mode=mode,
                         batch=args.batch_size, flip_test=margs.flip_test,
                         img_per_s=args.batch_size / dt, ms_per_iter=dt * 1e3))
        print(f"  eval {args.eval_backbone} {mode}: {rows[-1]['img_per_s']:.1f} img/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 4. MSCL pretraining: pairs/s of mscl.py's training step, both --fusion orders, against SimSiam's
# at the same batch

def mscl_config(cfg):
    """Time one mscl.py training step configuration in its own process (own peak memory)."""
    import mscl
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    args = mscl.get_args(["--data", "imagenet", "--batch-size",
                          str(cfg["batch_size"])] + cfg["flags"])
    model = mscl.build_model(args).to(device).train()
    optimizer = mscl.build_optimizer(model, mscl.batch_and_lr(args, 1)[2], args)
    weights = mscl.scale_weights(args)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(cfg["batch_size"], 3, 224, 224, generator=g).to(device) for _ in range(2))
    from torch.utils.flop_counter import FlopCounterMode
    # one pair: BatchNorm1d needs eval mode for a batch of 1; the count is linear in the batch
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x1[:1], x2[:1])
    model.train()

    def step():
        with autocast(args, device):
            p1, p2, z1, z2 = model(x1, x2)
        loss, _ = mscl.mscl_loss(p1, p2, z1, z2, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    dt, peak, _ = time_steps(step, cfg, device)
    return dict(model=cfg["name"], batch=cfg["batch_size"], pairs_per_s=cfg["batch_size"] / dt,
                ms_per_iter=dt * 1e3, peak_mib=peak,
                gmacs_per_pair=counter.get_total_flops() / 2 / 1e9)


def bench_mscl(args):
    """MSCL (four scales, FPN, ResNet-50) in both --fusion orders against SimSiam (--single-scale
    --no-fpn
    --dim 2048 --pred-dim 512)."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    amp = ["--amp", "bf16"] if args.device.type == "cuda" else []
    for batch in args.mscl_batches:
        for name, flags in [("SimSiam", ["--single-scale", "--no-fpn", "--dim", "2048",
                                         "--pred-dim", "512"]),
                            ("MSCL conv-pool", ["--fusion", "conv-pool"]),
                            ("MSCL pool-conv", ["--fusion", "pool-conv"])]:
            cfg = dict(name=name, flags=flags + amp, batch_size=batch, device=args.device.type,
                       threads=args.threads, iters=args.iters, warmup=args.warmup)
            with spawn.Pool(1) as pool:
                rows.append(pool.apply(mscl_config, (cfg,)))
            print(f"  mscl {name} batch {batch}: {rows[-1]['pairs_per_s']:.2f} pairs/s", flush=True)
        for row in rows[-2:]:
            row["vs_simsiam"] = row["pairs_per_s"] / rows[-3]["pairs_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------
# 5. LiftedCL pretraining: pairs/s of liftedcl.py's training step against MoCo v2's in the same code

def liftedcl_config(cfg):
    """Time one liftedcl.py training step (encoder step, then D step, as in liftedcl.main) in its
    own process."""
    import liftedcl
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    args = liftedcl.get_args(["--data", "coco", "--pretrained", "none", "--crop-size", "224",
                              "--batch-size", str(cfg["batch_size"])]
                             + cfg["flags"])
    # liftedcl.main in one process: the paper's 4 GPUs as 4 BatchNorm groups
    groups = args.bn_groups or 4
    model = liftedcl.LiftedCL(args.backbone, args.dim, args.moco_k, args.moco_m, args.moco_t,
                              args.lambda_equiv > 0, args.lambda_adv > 0, args.normalize_lifted,
                              args.align_size, groups).to(device).train()
    disc = liftedcl.Discriminator().to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr,
                                momentum=args.momentum, weight_decay=args.wd)
    d_optimizer = torch.optim.SGD(disc.parameters(), args.d_lr, momentum=args.momentum,
                                  weight_decay=args.wd)
    real = liftedcl.sample_prior(1000).to(device)
    g = torch.Generator().manual_seed(0)
    n = cfg["batch_size"]
    x1, x2 = (torch.randn(n, 3, 224, 224, generator=g).to(device) for _ in range(2))
    # the two crops overlap on their lower-right part; every second key view is flipped
    geom_q = torch.tensor([[0.0, 0.0, 200.0, 200.0, 0.0]], device=device).repeat(n, 1)
    geom_k = torch.tensor([[40.0, 30.0, 180.0, 190.0, 0.0]], device=device).repeat(n, 1)
    geom_k[1::2, 4] = 1.0

    def step():
        with autocast(args, device):
            out = model(x1, x2, geom_q, geom_k)
        loss, _ = liftedcl.encoder_loss(out, disc, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        liftedcl.discriminator_step(disc, d_optimizer,
                                    real[torch.randint(len(real), (n,), device=device)],
                                    out["lifted"])

    dt, peak, _ = time_steps(step, cfg, device)
    return dict(model=cfg["name"], batch=n, bn_groups=groups, pairs_per_s=n / dt,
                ms_per_iter=dt * 1e3, peak_mib=peak)


def bench_liftedcl(args):
    """LiftedCL (ResNet-50, K 16384, both contrasts, lifting, KCS discriminator) against MoCo v2,
    its degenerate setting (--lambda-inv 1 --lambda-equiv 0 --lambda-adv 0 --moco-k 4096), same
    shuffle-BN groups."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    amp = ["--amp", "bf16"] if args.device.type == "cuda" else []
    for batch in args.liftedcl_batches:
        for name, flags in [("MoCo v2 (liftedcl.py, degenerate)",
                             ["--lambda-inv", "1", "--lambda-equiv", "0",
                                                                     "--lambda-adv", "0",
                              "--moco-k", "4096"]),
                            ("LiftedCL", [])]:
            cfg = dict(name=name, flags=flags + amp, batch_size=batch, device=args.device.type,
                       threads=args.threads, iters=args.iters, warmup=args.warmup)
            with spawn.Pool(1) as pool:
                rows.append(pool.apply(liftedcl_config, (cfg,)))
            print(f"  liftedcl {name} batch {batch}: {rows[-1]['pairs_per_s']:.2f} pairs/s",
                  flush=True)
        rows[-1]["vs_moco"] = rows[-1]["pairs_per_s"] / rows[-2]["pairs_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------
# 6. ICON: icon.py's training step (icon.train_step + Adam) with the contrast (λp = 1, hard
# sampling, 256 queries and 512 negatives per class) against the same step at λp = 0 (the baseline),
# 256x192, batch 8

ICON_BATCH = 8


def icon_config(cfg):
    """Time one icon.py training step configuration in its own process (own peak memory)."""
    import icon
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    args = icon.get_args(["--data", "coco", "--backbone", cfg["backbone"], "--batch-size",
                          str(ICON_BATCH), "--lambda-p", str(cfg["lambda_p"]), "--pretrained",
                          "none"] + cfg["flags"])
    model = icon.build_networks(args, device)[2].train()  # the pose network (+ projection head)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = synthetic_batch(ICON_BATCH, args, device)
    batch["vis_flag"] = 2 * batch["visible"]
    batch["pid"] = torch.arange(ICON_BATCH)  # one person per crop

    def step():  # one iteration of icon.train: its train_step, then Adam
        loss, _ = icon.train_step(model, None, batch, args, device, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    dt, peak, _ = time_steps(step, cfg, device)
    return dict(model=cfg["backbone"] + (" + ICON" if cfg["lambda_p"] else ""), batch=ICON_BATCH,
                img_per_s=ICON_BATCH / dt, ms_per_iter=dt * 1e3, peak_mib=peak)


def bench_icon(args):
    rows = []
    spawn = multiprocessing.get_context("spawn")
    flags = ["--amp", "bf16", "--channels-last"] if args.device.type == "cuda" else []
    for backbone in args.icon_backbones:
        for lambda_p in (0, 1):
            cfg = dict(backbone=backbone, lambda_p=lambda_p, flags=flags, device=args.device.type,
                       threads=args.threads, iters=args.iters, warmup=args.warmup)
            with spawn.Pool(1) as pool:
                rows.append(pool.apply(icon_config, (cfg,)))
            print(f"  icon {rows[-1]['model']}: {rows[-1]['img_per_s']:.1f} img/s", flush=True)
        rows[-1]["added"] = rows[-1]["ms_per_iter"] / rows[-2]["ms_per_iter"] - 1
    return rows


# ----------------------------------------------------------------------------------------------
# 7. Semi-supervised: the dual step against two supervised steps of the same networks (same batch of
# pairs)

def semi_config(cfg):
    """ms per step of mrpose.py's --semi dual iteration and of two plain steps (net 1, then net
    2)."""
    from common.semi import ConsistencyTraining
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    args = mrpose_args("simplebaseline", cfg["backbone"], cfg["batch_size"], cfg["mode"])
    nets = [mrpose.build_model(args)[0] for _ in range(2)]
    dual = ConsistencyTraining(*nets, args.input_size, args.heatmap_size, args.num_joints,
                               args.scale_factor, args.rot_factor,
                               channels_last=args.channels_last).to(device).train()
    if args.channels_last:
        dual.to(memory_format=torch.channels_last)
    labeled, unlabeled = (synthetic_batch(cfg["batch_size"], args, device, seed) for seed in (0, 1))
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(dual.parameters(), lr=args.lr)
    plain = []  # each network's own supervised step (train_step, section 1)
    for net in nets:
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        plain.append((opt, torch.optim.lr_scheduler.MultiStepLR(opt, [10 ** 9], gamma=0.1)))
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")

    def dual_step():  # mrpose.train_step's --semi branch, line for line
        x = to_memory_format(normalize(labeled["image"].to(device, non_blocking=True)), args)
        xu = to_memory_format(normalize(unlabeled["image"].to(device, non_blocking=True)), args)
        target, weight = gaussian_targets(labeled["joints"].to(device),
                                          labeled["visible"].to(device), args.input_size,
                                          args.heatmap_size, args.sigma)
        with autocast(args, device):
            out = dual(x, xu, dual.draw_view(rng, xu.shape[0]))
        loss, _ = dual.loss(out, target, weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def two_steps():
        for net, (opt, sched) in zip(nets, plain):
            train_step(net, opt, sched, scaler, labeled, args, device)

    times = {}
    for name, step in (("dual", dual_step), ("two supervised", two_steps)):
        times[name] = time_steps(step, cfg, device)[0]
    return [dict(step=name, backbone=cfg["backbone"], mode=cfg["mode"], batch=cfg["batch_size"],
                 ms_per_iter=t * 1e3, pairs_per_s=cfg["batch_size"] / t,
                 vs_two_supervised=t / times["two supervised"])
            for name, t in times.items()]


def bench_semi(args):
    mode = args.modes[-1]
    cfg = dict(backbone=args.eval_backbone, mode=mode, device=args.device.type,
               batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
               threads=args.threads)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows = pool.apply(semi_config, (cfg,))
    print(f"  semi dual: {rows[0]['ms_per_iter']:.0f} ms/step, {rows[0]['vs_two_supervised']:.2f}x "
          f"two supervised steps",
          flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Output

def format_table(rows, columns):
    """Aligned plain-text table; columns are (key, header, format), numbers right-aligned."""
    def cell(row, key, fmt):
        v = row.get(key)
        return "n/a" if v is None else format(v, fmt)
    cells = [[h for _, h, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    numeric = [f != "s" for _, _, f in columns]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w,
                       num in zip(line, widths, numeric)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main():
    args = get_args()
    cuda = args.device.type == "cuda"
    name = device_name(args.device)
    peak = peak_bf16_flops(name) if cuda else None
    header = dict(device=name, device_type=args.device.type, torch=torch.__version__,
                  threads=args.threads, cpu_count=os.cpu_count(), load_avg_1min=os.getloadavg()[0],
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                  peak_bf16_tflops=peak / 1e12 if peak else None)
    print(f"device: {name} ({args.device.type})\ntorch: {torch.__version__}\n"
          f"threads: {args.threads} of {os.cpu_count()} CPUs (load average "
          f"{header['load_avg_1min']:.2f} at start)\ndate: {header['date']}\n"
          f"timing: {args.warmup} warm-up + {args.iters} timed iterations, batch "
          f"{args.batch_size}", flush=True)

    train = bench_training(args, peak)
    data, data_note = bench_data(args)
    evals = bench_eval(args)
    pretrain = bench_mscl(args) if args.mscl_batches else []
    lifted = bench_liftedcl(args) if args.liftedcl_batches else []
    icon_rows = bench_icon(args) if args.icon_backbones else []
    semi = bench_semi(args)

    mem = ("peak_mib", "peak MiB (cuda max_allocated)" if cuda
           else "peak RSS +MiB (ru_maxrss delta)", ".0f")
    train_cols = [("arch", "arch", "s"), ("backbone", "backbone", "s"), ("mode", "mode", "s"),
                  ("img_per_s", "img/s", ".1f"), ("ms_per_iter", "ms/iter", ".1f"), mem,
                  ("tflop_per_s", "model TFLOP/s", ".2f")]
    if cuda:
        train_cols.append(("mfu", "MFU (bf16 peak)", ".1%"))
    print(f"\n== 1. training step, 256x192 input, 17 joints, batch {args.batch_size} "
          f"(forward, gaussian_targets, joints MSE, Adam; 1 step = 3x forward FLOPs) ==")
    print(format_table(train, train_cols))
    if cuda and peak is None:
        print(f"MFU n/a: no known bf16 peak for {name}")

    print("\n== 2. data pipeline, one process (workers=0) on 1 thread as a loader worker, 256x192, "
          "COCO preset augmentation + half-body 0.3 ==")
    if data:
        print(format_table(data, [("pipeline", "pipeline", "s"),
                                  ("samples_per_s", "worker samples/s", ".1f"),
                                  ("ms_per_sample", "worker ms/sample", ".2f"),
                                  ("step_ms_per_sample", "device step ms/sample", ".2f"),
                                  ("total_ms_per_sample", "total ms/sample", ".2f")]))
        print(data_note)
    else:
        print(data_note)

    print(f"\n== 3. evaluation (predict: forward + flip test + decode), batch {args.batch_size} ==")
    print(format_table(evals, [("arch", "arch", "s"), ("backbone", "backbone", "s"),
                               ("mode", "mode", "s"), ("img_per_s", "img/s", ".1f"),
                               ("ms_per_iter", "ms/iter", ".1f")]))
    if pretrain:
        print(f"\n== 4. MSCL pretraining step, ResNet-50, two 224x224 views "
              f"({'bf16 autocast' if cuda else 'fp32'}) ==")
        print(format_table(pretrain, [("model", "model", "s"), ("batch", "batch", "d"),
                                      ("pairs_per_s", "pairs/s", ".2f"),
                                      ("ms_per_iter", "ms/iter", ".1f"), mem,
                                      ("gmacs_per_pair", "GFLOPs/pair (fwd MACs)", ".2f"),
                                      ("vs_simsiam", "vs SimSiam", ".2f")]))
    if lifted:
        print(f"\n== 5. LiftedCL pretraining step, ResNet-50, two 224x224 views, encoder + D step "
              f"({'bf16 autocast' if cuda else 'fp32'}) ==")
        print(format_table(lifted, [("model", "model", "s"), ("batch", "batch", "d"),
                                    ("bn_groups", "BN groups", "d"),
                                    ("pairs_per_s", "pairs/s", ".2f"),
                                    ("ms_per_iter", "ms/iter", ".1f"), mem,
                                    ("vs_moco", "vs MoCo v2", ".2f")]))
    if icon_rows:
        print(f"\n== 6. ICON training step, 256x192, batch {ICON_BATCH} "
              f"({'bf16 autocast + channels_last' if cuda else 'fp32'}): baseline (λp = 0) and + "
              f"ICON (hard sampling, 256 queries, 512 negatives) ==")
        print(format_table(icon_rows, [("model", "model", "s"), ("img_per_s", "img/s", ".1f"),
                                       ("ms_per_iter", "ms/iter", ".1f"), mem,
                                       ("added", "step time added", ".1%")]))
    print(f"\n== 7. semi-supervised step (--semi dual: 2 SimpleBaseline-{args.eval_backbone}, "
          f"{semi[0]['mode']}), batch {args.batch_size} labeled + {args.batch_size} unlabeled vs "
          f"two supervised steps on the labeled batch ==")
    print(format_table(semi, [("step", "step", "s"), ("ms_per_iter", "ms/iter", ".1f"),
                              ("pairs_per_s", "pairs/s", ".2f"),
                              ("vs_two_supervised", "vs two supervised", ".2f")]))
    if args.out:
        save_json(args.out, dict(header=header, train=train, data=data, data_note=data_note,
                                 eval=evals, mscl=pretrain, liftedcl=lifted, icon=icon_rows,
                                 semi=semi))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
