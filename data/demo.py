"""Synthetic COCO person-keypoint dataset: stick-figure people on cluttered backgrounds.

The output is a real COCO-format dataset (JPEG images + person_keypoints_*.json), so the COCO
reader and pycocotools' COCOeval run on it unchanged. It exists to smoke-test and demo the
top-down pipeline on a CPU in minutes, not to say anything about real human pose.

Every image is drawn from its own numpy Generator seeded by (seed, split, index), so the data
does not depend on generation order or on the number of worker processes.

    python -m data.demo --out data/cache/demo-s0 --seed 0 --n-train 2000 --n-val 200
"""
import argparse
import io
import json
import math
import os
import shutil
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

from common.utils import UserError, run_main, save_json

# Bump whenever drawing or annotation changes, so cached datasets are regenerated.
GENERATOR_VERSION = 3

KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]
# The standard COCO person skeleton (1-based keypoint indices).
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
CATEGORY = {"id": 1, "name": "person", "supercategory": "person",
            "keypoints": KEYPOINT_NAMES, "skeleton": SKELETON}
SPLITS = ("train2017", "val2017")

# Body proportions as fractions of the standing height H (head top to soles ~0.95 H).
# pelvis -> shoulder centre, shoulder centre -> head centre
TORSO, NECK = 0.30, 0.115
HEAD_RX, HEAD_RY = 0.055, 0.068           # head ellipse half-axes
UPPER_ARM, FOREARM, THIGH, SHIN = 0.17, 0.15, 0.24, 0.23
# Limb half-widths at (proximal, distal) end, before the per-person build factor.
WIDTH = {"upper_arm": (0.030, 0.024), "forearm": (0.024, 0.019),
         "thigh": (0.042, 0.032), "shin": (0.032, 0.024)}

JPEG_QUALITY = 90


def default_demo_root(seed=0):
    """<repo>/data/cache/demo-s<seed> (data/cache is git-ignored)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", f"demo-s{seed}")


# ---------------------------------------------------------------- geometry helpers

def _dir(deg):
    """Unit vector for an angle in degrees in image coordinates: 0 = down, 90 = image-right, 180 =
    up."""
    r = math.radians(deg)
    return np.array([math.sin(r), math.cos(r)])


def _ellipse_pts(center, rx, ry, up, n=24):
    """Polygon of an ellipse whose ry axis points along the unit vector `up` (PIL cannot rotate
    ellipses)."""
    right = np.array([-up[1], up[0]])  # perpendicular: image-right when up = (0, -1)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return center + np.outer(np.cos(t) * rx, right) + np.outer(np.sin(t) * ry, up)


def _limb_quad(a, b, wa, wb):
    """Tapered limb from point a (half-width wa) to b (half-width wb) as a quadrilateral."""
    d = b - a
    n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
    return np.array([a + n * wa, b + n * wb, b - n * wb, a - n * wa])


# ---------------------------------------------------------------- one person

def _sample_pose(rng):
    """Random articulated pose in body units (H = 1, pelvis at the origin, y down).

    Returns the 17 keypoints (COCO order), the limb segments with their half-widths, the head
    (centre, up and right unit vectors), whether the person faces the viewer, and the torso frame.
    Left/right is the person's own: facing the viewer, their left side appears on the image's right.
    The only left/right cue in the image is the face (eyes and nose vs. hair), so horizontal-flip
    augmentation with the usual left/right label swap stays consistent with the pixels.
    """
    front = rng.random() < 0.9
    left_side = 1.0 if front else -1.0          # image side (+1 = right) of the person's left limbs
    kp = np.zeros((17, 2))

    trunk = 180.0 + rng.normal(0, 6)             # trunk direction, pointing up from the pelvis
    neck = TORSO * _dir(trunk)
    right = _dir(trunk - 90)                     # image-right, perpendicular to the trunk
    yaw_squash = rng.uniform(0.75, 1.0)          # body turned slightly away from the camera
    sw, hw = rng.uniform(0.10, 0.13) * yaw_squash, rng.uniform(0.07, 0.09) * yaw_squash
    build = rng.uniform(0.8, 1.25)               # limb thickness
    w = {name: (wa * build, wb * build) for name, (wa, wb) in WIDTH.items()}

    limbs = {}                                   # (name, image side) -> (a, b, wa, wb)
    for k, s in ((0, left_side), (1, -left_side)):  # k = 0: left, first in each COCO pair
        shoulder, hip = neck + s * sw * right, s * hw * right

        # Arms: abduction from hanging down (0) through horizontal (90) to raised (~170);
        # negative values cross the arm over the body.
        abduct = rng.uniform(-35, 170)
        bend = rng.uniform(-25, 25) if rng.random() < 0.4 else rng.uniform(-150, 150)
        a_up = trunk - 180 + s * abduct
        elbow = shoulder + UPPER_ARM * rng.uniform(0.75, 1.0) * _dir(a_up)
        wrist = elbow + FOREARM * rng.uniform(0.75, 1.0) * _dir(a_up + bend)

        # Legs: mostly standing / walking, sometimes kicking or kneeling-like.
        spread = rng.uniform(-10, 30) if rng.random() < 0.75 else rng.uniform(-25, 85)
        knee_bend = rng.uniform(-40, 40) if rng.random() < 0.7 else rng.uniform(-110, 110)
        a_th = s * spread
        knee = hip + THIGH * rng.uniform(0.75, 1.0) * _dir(a_th)
        ankle = knee + SHIN * rng.uniform(0.75, 1.0) * _dir(a_th + knee_bend)

        kp[5 + k], kp[7 + k], kp[9 + k] = shoulder, elbow, wrist
        kp[11 + k], kp[13 + k], kp[15 + k] = hip, knee, ankle
        limbs["upper_arm", s] = (shoulder, elbow) + w["upper_arm"]
        limbs["forearm", s] = (elbow, wrist) + w["forearm"]
        limbs["thigh", s] = (hip, knee) + w["thigh"]
        limbs["shin", s] = (knee, ankle) + w["shin"]

    # Head: tilted on the neck; face features shifted sideways by a small head yaw.
    head_dir = trunk + rng.normal(0, 10)
    up = _dir(head_dir)
    head_right = np.array([-up[1], up[0]])
    center = neck + NECK * up
    yaw = rng.uniform(-0.3, 0.3)
    for k, s in ((0, left_side), (1, -left_side)):
        kp[1 + k] = center + HEAD_RX * (0.4 * s + yaw) * head_right + 0.12 * HEAD_RY * up   # eyes
        # ears
        kp[3 + k] = center + HEAD_RX * (0.98 * s - 0.3 * yaw) * head_right + 0.05 * HEAD_RY * up
    kp[0] = center + HEAD_RX * 1.2 * yaw * head_right - 0.25 * HEAD_RY * up                  # nose
    head = (center, up, head_right)
    return kp, limbs, head, front, (neck, sw, hw, right)


def _rotate(pts, deg):
    """Rotate points about the origin (the pelvis) by `deg` degrees, clockwise on screen."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return pts @ np.array([[c, s], [-s, c]])


def _random_colour(rng, lo=30, hi=230):
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _shade(colour, f):
    return tuple(int(min(255, c * f)) for c in colour)


SKIN_TONES = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36),
              (92, 58, 36)]


class _Person:
    """A sampled pose with its palette, placed in the image by scale H and translation t."""

    def __init__(self, rng):
        kp, limbs, head, self.front, torso = _sample_pose(rng)
        # Whole-body tilt: half the people nearly upright, the rest tilted up to +-30 degrees.
        tilt = rng.uniform(-30, 30) if rng.random() < 0.5 else rng.uniform(-8, 8)
        rot = lambda p: _rotate(np.asarray(p, dtype=float), tilt)
        self.kp = rot(kp)
        self.limbs = {key: (rot(a), rot(b), wa, wb) for key, (a, b, wa, wb) in limbs.items()}
        center, up, head_right = head
        self.head = (rot(center), rot(up), rot(head_right))
        neck, sw, hw, right = torso
        self.torso = rot(np.array([neck - (sw + 0.03) * right, neck + (sw + 0.03) * right,
                                   (hw + 0.035) * right, -(hw + 0.035) * right]))
        self.neck = rot(neck)
        # Extent in body units (keypoints plus limb/head margins), used for placement.
        self.extent = np.concatenate([self.kp.min(0) - 0.07, self.kp.max(0) + 0.07])

        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
        shirt, pants = _random_colour(rng), _random_colour(rng)
        self.colour = {
            "skin": skin, "shirt": shirt, "pants": pants,
            "forearm": shirt if rng.random() < 0.5 else skin,      # long or short sleeves
            "shin": pants if rng.random() < 0.7 else skin,         # trousers or shorts
            "shoe": _random_colour(rng, 10, 90), "hair": _random_colour(rng, 10, 120),
            "eye": (20, 20, 25), "nose": _shade(skin, 0.6),
        }
        self.H, self.t = 1.0, np.zeros(2)

    def box(self):
        """Image-space placement box (x0, y0, x1, y1) from the body extent."""
        return np.concatenate([self.extent[:2] * self.H + self.t,
                               self.extent[2:] * self.H + self.t])

    def draw(self, draw, mask):
        """Draw the person on the RGB canvas and its silhouette (255) on the 'L' mask."""
        H, t, c = self.H, self.t, self.colour
        img = lambda p: np.asarray(p) * H + t

        def poly(pts, fill, outline=True):
            pts = [tuple(p) for p in img(pts)]
            draw.polygon(pts, fill=fill, outline=_shade(fill, 0.55) if outline else None)
            mask.polygon(pts, fill=255)

        def disc(p, r, fill, outline=True):
            (x, y), r = img(p), max(r * H, 1.0)
            box = [x - r, y - r, x + r, y + r]
            draw.ellipse(box, fill=fill, outline=_shade(fill, 0.55) if outline else None)
            mask.ellipse(box, fill=255)

        def limb(key, colour):
            a, b, wa, wb = self.limbs[key]
            poly(_limb_quad(a, b, wa, wb), colour)
            disc(a, wa, colour)  # round joint so elbows/knees look articulated
            disc(b, wb, colour)

        sides = [1.0, -1.0]
        # Legs behind the torso, arms in front of it (so crossed arms show), head last.
        for s in sides:
            limb(("thigh", s), c["pants"])
            limb(("shin", s), c["shin"])
            ankle, shin_dir = (self.limbs["shin", s][1],
                               self.limbs["shin", s][1] - self.limbs["shin", s][0])
            foot = ankle + 0.035 * shin_dir / (np.linalg.norm(shin_dir) + 1e-9)
            disc(foot, 0.028, c["shoe"])
        poly(self.torso, c["shirt"])
        center, up, head_right = self.head
        poly(_limb_quad(self.neck, center, 0.022, 0.022), c["skin"], outline=False)
        for s in sides:
            limb(("upper_arm", s), c["shirt"])
            limb(("forearm", s), c["forearm"])
            elbow, wrist = self.limbs["forearm", s][:2]
            hand = wrist + 0.03 * (wrist - elbow) / (np.linalg.norm(wrist - elbow) + 1e-9)
            disc(hand, 0.026, c["skin"])
        for k in (3, 4):  # ears first, half hidden behind the head outline
            disc(self.kp[k], 0.016, _shade(c["skin"], 0.85))
        if self.front:
            poly(_ellipse_pts(center, HEAD_RX, HEAD_RY, up), c["skin"])
            # Hair cap over the upper third of the head.
            arc = np.linspace(0.15 * np.pi, 0.85 * np.pi, 12)
            cap = (center + np.outer(np.cos(arc) * HEAD_RX * 1.03,
                                     head_right) + np.outer(np.sin(arc) * HEAD_RY * 1.05, up))
            poly(cap, c["hair"], outline=False)
            for k in (1, 2):
                disc(self.kp[k], 0.009, c["eye"], outline=False)
            disc(self.kp[0], 0.010, c["nose"], outline=False)
        else:
            # back of the head: all hair
            poly(_ellipse_pts(center, HEAD_RX, HEAD_RY, up), c["hair"])


# ---------------------------------------------------------------- one image

def _background(rng, size):
    """Smooth colour noise + gradient (+ stripes) + random clutter shapes."""
    k = int(rng.integers(2, 9))
    coarse = Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
    bg = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]
    bg = 0.6 * bg + 0.4 * (ramp * rng.uniform(0, 255, 3) + (1 - ramp) * rng.uniform(0, 255, 3))
    if rng.random() < 0.4:
        ang, freq = rng.uniform(0, np.pi), rng.uniform(3, 15)
        stripes = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy)
                         + rng.uniform(0, 6.3))
        bg += stripes[..., None] * rng.uniform(-40, 40, 3)
    bg += rng.normal(0, rng.uniform(0, 8), bg.shape)
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.4, 2) * size
        colour, kind = _random_colour(rng, 0, 256), rng.integers(4)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            draw.polygon([tuple(p) for p in rng.uniform(-0.1, 1.1, (3, 2)) * size], fill=colour)
        else:  # thin bars: limb-like distractors
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(1, 7)))
    return im


def _place(people, rng, size):
    """Choose each person's height and position; some are allowed to be cut by the image border."""
    lo, hi = {1: (0.45, 0.95), 2: (0.40, 0.85), 3: (0.35, 0.75)}[len(people)]
    for p in people:
        p.H = rng.uniform(lo, hi) * size
    people.sort(key=lambda p: p.H)  # bigger = closer to the camera = drawn later, in front
    boxes = []
    for p in people:
        ext = p.extent * p.H
        w, h = ext[2] - ext[0], ext[3] - ext[1]
        slack = rng.uniform(0.1, 0.35) if rng.random() < 0.2 else 0.0  # fraction allowed outside
        lo_t = -ext[:2] - slack * np.array([w, h])
        hi_t = size - ext[2:] + slack * np.array([w, h])
        best = None
        for _ in range(8):  # prefer spots that do not bury earlier people completely
            t = np.where(hi_t > lo_t, rng.uniform(np.minimum(lo_t, hi_t), np.maximum(lo_t, hi_t)),
                         (lo_t + hi_t) / 2)
            p.t = t
            overlap = max([_iou(p.box(), b) for b in boxes], default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, t)
            if overlap < 0.4:
                break
        p.t = best[1]
        boxes.append(p.box())
    return people


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def render_image(seed, split, index, size):
    """Draw one image. Returns (RGB PIL image, list of per-person annotation dicts without ids)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    im = _background(rng, size)
    n_people = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    people = _place([_Person(rng) for _ in range(n_people)], rng, size)

    draw = ImageDraw.Draw(im)
    masks = []
    for p in people:
        m = Image.new("L", (size, size), 0)
        p.draw(draw, ImageDraw.Draw(m))
        masks.append(np.asarray(m) > 0)

    anns = []
    in_front = np.zeros((size, size), bool)  # union of silhouettes drawn after the current person
    for p, m in reversed(list(zip(people, masks))):
        kp = np.round(p.kp * p.H + p.t, 2)
        v = np.full(17, 2)
        if not p.front:
            v[:3] = 0  # nose and eyes are not visible from behind: unlabeled, as in COCO
        inside = (kp >= 0).all(1) & (kp <= size - 1).all(1)
        v[~inside] = 0
        cols, rows = (np.round(kp[:, 0]).astype(int).clip(0, size - 1),
                      np.round(kp[:, 1]).astype(int).clip(0, size - 1))
        v[(v == 2) & in_front[rows, cols]] = 1
        kp[v == 0] = 0

        # COCO's bbox/area come from the segmentation: here the full silhouette (before occlusion),
        # grown to contain every labeled keypoint so the box always encloses them.
        ys, xs = np.nonzero(m)
        lab = v > 0
        x0, y0 = min([xs.min()] + list(kp[lab, 0])), min([ys.min()] + list(kp[lab, 1]))
        x1, y1 = max([xs.max() + 1.0] + list(kp[lab, 0])), max([ys.max() + 1.0] + list(kp[lab, 1]))
        anns.append({
            "category_id": 1, "iscrowd": 0, "num_keypoints": int(lab.sum()),
            "keypoints": [n for (x, y), vis in zip(kp.tolist(), v.tolist()) for n in (x, y, vis)],
            "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                     round(float(y1 - y0), 2)],
            "area": float(m.sum()),
        })
        in_front |= m
    anns.reverse()  # back to drawing order
    return im, anns


def _render_to_file(job):
    """Worker: render one image, save it as JPEG, return (file_name, annotations)."""
    seed, split, index, size, folder = job
    im, anns = render_image(seed, split, index, size)
    file_name = f"{index + 1:012d}.jpg"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    with open(os.path.join(folder, file_name), "wb") as f:
        f.write(buf.getvalue())
    return file_name, anns


# ---------------------------------------------------------------- whole dataset

def _config(seed, n_train, n_val, size):
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train,
            "n_val": n_val, "size": size}


def _read_done(root):
    try:
        with open(os.path.join(root, "DONE.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_demo(root, seed=0, n_train=2000, n_val=200, size=192, workers=None):
    """Generate the demo dataset under `root` (cached: returns at once if it is already there).

    `workers` processes draw the images (default: all CPU cores); the result does not depend on it.
    Returns `root` as a string.
    """
    root = os.path.abspath(os.fspath(root))
    if n_train < 1 or n_val < 1 or size < 64:
        raise UserError(f"demo set needs n_train, n_val >= 1 and size >= 64 (got {n_train}, "
                        f"{n_val}, {size})")
    config = _config(seed, n_train, n_val, size)
    done = _read_done(root)
    if done is not None and done.get("config") == config:
        return root
    # Only ever delete a stale demo set, never a folder the user pointed at by mistake.
    if os.path.exists(root) and done is None and os.listdir(root):
        raise UserError(f"{root} exists and is not a demo dataset (no DONE.json); refusing to "
                        f"overwrite it")

    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for split, n in zip(SPLITS, (n_train, n_val)):
        os.makedirs(os.path.join(tmp, split))
        jobs += [(seed, split, i, size, os.path.join(tmp, split)) for i in range(n)]
    os.makedirs(os.path.join(tmp, "annotations"))

    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 64:  # a pool costs more than it saves on a handful of images
        with Pool(workers) as pool:
            results = pool.map(_render_to_file, jobs, chunksize=32)
    else:
        results = [_render_to_file(j) for j in jobs]

    stats = {}
    for split, n in zip(SPLITS, (n_train, n_val)):
        split_results, results = results[:n], results[n:]
        images, annotations = [], []
        for index, (file_name, anns) in enumerate(split_results):
            images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
            for a in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **a})
        coco = {"info": {"description": f"synthetic demo people, seed {seed}",
                         "version": str(GENERATOR_VERSION)},
                "images": images, "annotations": annotations, "categories": [CATEGORY]}
        with open(os.path.join(tmp, "annotations", f"person_keypoints_{split}.json"), "w") as f:
            json.dump(coco, f)
        vis = np.array([a["keypoints"][2::3] for a in annotations])
        stats[split] = {"images": len(images), "persons": len(annotations),
                        "visible": int((vis == 2).sum()), "occluded": int((vis == 1).sum()),
                        "unlabeled": int((vis == 0).sum())}
    save_json(os.path.join(tmp, "DONE.json"), {"config": config, "stats": stats})

    if os.path.exists(root):
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished the same dataset first: keep theirs if it is the one we want.
        shutil.rmtree(tmp, ignore_errors=True)
        if (_read_done(root) or {}).get("config") != config:
            raise
    return root


def main():
    ap = argparse.ArgumentParser(description="Write the synthetic COCO-keypoints demo dataset.")
    ap.add_argument("--out", default=None, help="output folder (default: data/cache/demo-s<seed>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--size", type=int, default=192, help="square image side in pixels")
    ap.add_argument("--workers", type=int, default=None,
                    help="drawing processes (default: all cores)")
    args = ap.parse_args()
    t0 = time.time()
    root = make_demo(args.out or default_demo_root(args.seed), args.seed, args.n_train, args.n_val,
                     args.size, args.workers)
    stats = _read_done(root)["stats"]
    for split, s in stats.items():
        print(f"{split}: {s['images']} images, {s['persons']} persons, keypoints visible "
              f"{s['visible']}, occluded {s['occluded']}, unlabeled {s['unlabeled']}")
    print(f"wrote {root} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
