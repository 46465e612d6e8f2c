"""Views per second per CPU core of MoCo v2's augmentation, before and after the split of
common/devaug.py, side by side in one process on one thread: the stages alternate in rounds, so a
load that comes and goes weighs on all of them alike.

    python -m eval.bench_data [--images DIR] [--size 224] [--rounds 5] [--batch 64] [--device cuda]

Rows: the JPEG decode (per image, shared by both paths); before, the per-image pipeline a loader
worker runs today (random resized crop, colour jitter, grayscale, blur, flip, normalised float
tensor); after, the worker's half (crop, flip, uint8) and, for --aug-device cpu, the batched
photometric half on this CPU. With --aug-device cuda a worker's core pays only the decode and the
crop. --device times the batched halves on that device too (on the CPU, still one thread): the
photometric part per view, and --data-device's decode + crop per image."""
import argparse
import time
from pathlib import Path

import torch

from common.datasets import list_images, read_image
from common.devaug import BatchAppearance, CropFlip, collate_jpeg, decode_crops, read_jpeg
from common.transforms import affine_matrix
from common.ssl import moco_v2_augmentation
from common.utils import run_main

# the sample next to the checkout (tests/helpers.py)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=str(SHARED / "coco_mini" / "train2017"),
                   help="JPEG folder (default: the "
                   "shared COCO train2017 sample)")
    p.add_argument("--size", type=int, default=224, help="view size (MoCo v2, SimSiam: 224)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds; each times every stage once on every image")
    p.add_argument("--batch", type=int, default=64,
                   help="views per call of the batched photometric half")
    p.add_argument("--device", default=None, help="also time the batched halves on this device "
                                                  "(cpu, cuda)")
    p.add_argument("--device-batch", type=int, default=256,
                   help="views or images per batch with --device")
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    args = get_args()
    torch.set_num_threads(1)  # per core: what one loader worker or one thread of the trainer does
    files = list_images(args.images)
    torch.manual_seed(0)
    images = [read_image(f) for f in files]
    before, worker, batched = (moco_v2_augmentation(args.size), CropFlip(args.size),
                               BatchAppearance(torch.device("cpu")))
    views = torch.stack([worker(images[i % len(images)]) for i in range(args.batch)])
    stages = {"decode (per image)": lambda: [read_image(f) for f in files],
              "before: per-image PIL view": lambda: [before(im) for im in images],
              "after: worker crop + flip (uint8)": lambda: [worker(im) for im in images],
              "after: batched colour/gray/blur, CPU": lambda: [batched(views)
                                                               for _ in range(max(1, len(images)
                                                                                  // args.batch))]}
    counts = {"decode (per image)": len(files), "before: per-image PIL view": len(images),
              "after: worker crop + flip (uint8)": len(images),
              "after: batched colour/gray/blur, CPU": max(1,
                                                          len(images) // args.batch) * args.batch}
    for fn in stages.values():  # warm-up
        fn()
    seconds = dict.fromkeys(stages, 0.0)
    for _ in range(args.rounds):
        for name, fn in stages.items():
            seconds[name] += timed(fn)
    ms = {k: 1000 * seconds[k] / (counts[k] * args.rounds) for k in stages}
    print(f"{len(files)} JPEGs from {args.images}, {args.size} px views, 1 thread, {args.rounds} "
          f"interleaved rounds")
    print(f"{'stage':40s} {'ms/view':>8s} {'views/s/core':>13s}")
    for k in stages:
        print(f"{k:40s} {ms[k]:8.3f} {1000 / ms[k]:13.0f}")
    dec, b, w, c = ms.values()
    print("pairs/s per core, decode included (one decode, two views):")
    for name, per_pair in [("before (per-image PIL)", dec + 2 * b),
                           ("after, --aug-device cuda (worker side)", dec + 2 * w),
                           ("after, --aug-device cpu (worker + batched)", dec + 2 * (w + c))]:
        print(f"  {name:44s} {1000 / per_pair:7.0f}")

    if args.device:
        device_figures(files, args)


def device_figures(files, args):
    """Throughput of the batched halves on --device: BatchAppearance on uint8 views, and
    decode_crops (decode_jpeg + affine_grid crops at 192x256, a centred crop of 90 % of each image)
    on JPEG bytes."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = args.device_batch
    worker = CropFlip(args.size)
    images = [read_image(f) for f in files]
    views = torch.stack([worker(images[i % len(images)]) for i in range(n)]).to(device)
    appearance = BatchAppearance(device)
    items = []
    for i in range(n):
        data, width = read_jpeg(files[i % len(files)])
        w, h = images[i % len(images)].size
        m = affine_matrix((w / 2, h / 2), (0.9 * w, 0.9 * w * 4 / 3), 0.0, (192, 256))
        items.append({"jpeg": data, "matrix": torch.from_numpy(m)})
    batch = collate_jpeg(items)

    def crops():
        decode_crops(dict(batch, jpeg=list(batch["jpeg"])), device, (192, 256))

    for name, fn in [(f"BatchAppearance, {args.size} px views", lambda: appearance(views)),
                     ("decode_crops, 192x256 crops from JPEG", crops)]:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            fn()
        sync()
        per_s = n * args.rounds / (time.perf_counter() - t0)
        print(f"{device}: {name:40s} {per_s:9.0f} /s (batch {n})")


if __name__ == "__main__":
    run_main(main)
