"""Dataset readers (COCO keypoints, MPII in the HRNet json layout, unlabeled image folders) and
the top-down training/evaluation dataset built on them.

A reader returns a list of person records: {image, image_id, center, scale, joints (K, 2),
visible (K,), area, score}, and from read_coco the raw visibility flag vis_flag (K,) of the file
(0 unlabeled, 1 occluded, 2 visible). Each reader filters what cannot train and counts what it skipped.
"""
import contextlib
import io
import math
import os

import numpy as np
import torch
from PIL import Image

from common.transforms import (affine_matrix, apply_affine, box_to_center_scale, half_body_center_scale,
                               to_tensor_uint8, warp_image)
from common.utils import UserError, load_json

COCO_JOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
               "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
               "right_knee", "left_ankle", "right_ankle"]
COCO_FLIP_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
COCO_UPPER = list(range(11))
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]

MPII_JOINTS = ["r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
               "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist"]
MPII_FLIP_PAIRS = [(0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)]
MPII_UPPER = [7, 8, 9, 10, 11, 12, 13, 14, 15]
MPII_SKELETON = [(0, 1), (1, 2), (2, 6), (3, 6), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (10, 11), (11, 12),
                 (12, 7), (13, 7), (13, 14), (14, 15)]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_coco(ann_file):
    """pycocotools COCO object for a keypoint json (read once), with a one-line error for a bad file."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = load_json(os.fspath(ann_file), "annotation file")
    if not isinstance(coco.dataset, dict) or "annotations" not in coco.dataset or "images" not in coco.dataset:
        raise UserError(f"{ann_file}: not a COCO annotation file (needs 'images' and 'annotations')")
    missing_area = [a.get("id") for a in coco.dataset["annotations"] if "area" not in a]
    if missing_area:  # COCOeval's OKS divides by the GT area; without it pycocotools dies with a bare KeyError
        raise UserError(f"{ann_file}: annotation id {missing_area[0]} has no 'area' (OKS needs it)")
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints "creating index..."
        coco.createIndex()
    return coco


def read_coco(coco, image_dir, aspect_ratio, image_ids=None, det_json=None, det_thresh=0.0):
    """Person records of a COCO keypoint set: ground-truth boxes, or detections from `det_json`.

    Ground truth skips crowd regions, degenerate boxes and persons without a labeled joint (they
    give no training signal and COCOeval ignores them). Returns (records, skipped counts)."""
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory not found")
    image_ids = sorted(coco.getImgIds()) if image_ids is None else image_ids
    k = len(coco.loadCats(1)[0]["keypoints"]) if coco.getCatIds() else 17
    records, skipped = [], {"crowd": 0, "bad_box": 0, "no_joints": 0, "low_score": 0}
    if det_json is not None:
        dets = load_json(det_json, "detection file")
        if not isinstance(dets, list):
            raise UserError(f"{det_json}: expected a list of COCO detection results")
        wanted = set(image_ids)
        for d in dets:
            if d.get("category_id", 1) != 1 or d["image_id"] not in wanted:
                continue
            if d["score"] < det_thresh:
                skipped["low_score"] += 1
                continue
            info = coco.imgs[d["image_id"]]
            center, scale = box_to_center_scale(d["bbox"], aspect_ratio)
            records.append(dict(image=os.path.join(image_dir, info["file_name"]), image_id=d["image_id"],
                                center=center, scale=scale, joints=np.zeros((k, 2), np.float32),
                                visible=np.zeros(k, np.float32), area=float(scale[0] * scale[1]),
                                score=float(d["score"])))
        return records, skipped
    for image_id in image_ids:
        info = coco.imgs[image_id]
        for obj in coco.imgToAnns.get(image_id, []):
            if obj.get("category_id", 1) != 1:
                continue
            if obj.get("iscrowd", 0):
                skipped["crowd"] += 1
                continue
            # HRNet's box cleaning: clip to the image, drop empty boxes
            x, y, w, h = obj["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2 = min(info["width"] - 1.0, x1 + max(0.0, w - 1))
            y2 = min(info["height"] - 1.0, y1 + max(0.0, h - 1))
            if obj.get("area", 1) <= 0 or x2 < x1 or y2 < y1:
                skipped["bad_box"] += 1
                continue
            kp = np.asarray(obj["keypoints"], dtype=np.float32).reshape(-1, 3)
            if kp[:, 2].max() <= 0:
                skipped["no_joints"] += 1
                continue
            center, scale = box_to_center_scale((x1, y1, x2 - x1, y2 - y1), aspect_ratio)
            records.append(dict(image=os.path.join(image_dir, info["file_name"]), image_id=image_id,
                                center=center, scale=scale, joints=kp[:, :2].copy(),
                                visible=np.minimum(kp[:, 2], 1.0), vis_flag=kp[:, 2].copy(),
                                area=float(obj.get("area", w * h)), score=1.0))
    return records, skipped


def read_mpii(ann_file, image_dir, aspect_ratio):
    """Records of an MPII annotation file in the HRNet layout (annot/train.json, annot/valid.json).

    As HRNet: the centre moves down by 15·scale and the box grows by 1.25 to keep the limbs, and the
    Matlab 1-based coordinates become 0-based. `scale` (in units of 200 px) becomes pixels."""
    annotations = load_json(ann_file, "MPII annotation file")
    if not isinstance(annotations, list) or (annotations and "joints" not in annotations[0]):
        raise UserError(f"{ann_file}: not an MPII annotation list in the HRNet format")
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory not found")
    records, skipped = [], {"no_joints": 0}
    for i, a in enumerate(annotations):
        joints = np.asarray(a["joints"], dtype=np.float32) - 1.0
        visible = np.asarray(a["joints_vis"], dtype=np.float32)
        if visible.max() <= 0:
            skipped["no_joints"] += 1
            continue
        center = np.asarray(a["center"], dtype=np.float32)
        side = a["scale"] * 200.0
        center[1] += 15 * a["scale"]
        center -= 1.0
        w, h = (side * aspect_ratio, side) if aspect_ratio <= 1 else (side, side / aspect_ratio)
        records.append(dict(image=os.path.join(image_dir, a["image"]), image_id=i, center=center,
                            scale=np.array([w, h], np.float32) * 1.25, joints=joints, visible=visible,
                            area=float(w * h * 1.5625), score=1.0, annotation=i))
    return records, skipped


def list_images(root):
    """Every image file below `root` (an ImageNet-style train/<class>/*.JPEG tree or any folder)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: image folder not found")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def load_image(path, scale=1.0):
    """(RGB PIL image, the file's (width, height)), or a one-line error naming the file.

    With `scale` < 1 (the caller shrinks the image by at least that factor), a JPEG is decoded at
    1/2, 1/4 or 1/8 of its size straight from the DCT coefficients, several times faster than a full
    decode (and anti-aliased); the image is then smaller than the file's size."""
    try:
        img = Image.open(path)
        size = img.size
        if scale < 1.0:
            img.draft("RGB", (math.ceil(size[0] * scale), math.ceil(size[1] * scale)))
        img.load()
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable image ({e})") from None
    return (img if img.mode == "RGB" else img.convert("RGB")), size


def read_image(path):
    return load_image(path)[0]


class TopDownDataset(torch.utils.data.Dataset):
    """Person crops for top-down pose: one affine per sample moves pixels and joints together.

    Training augmentation (SimpleBaseline/HRNet): half-body, scale, rotation, flip. The random draws
    of sample `i` in epoch `e` come from a generator seeded with (seed, e, i), so a run is the same
    whatever the number of workers and after a resume. Heatmap targets are built per batch on the
    training device (common.heatmap.gaussian_targets), not here."""

    def __init__(self, records, input_size, flip_pairs, upper_ids, train=False, scale_factor=0.35,
                 rot_factor=30.0, flip=True, half_body_prob=0.0, half_body_min_joints=8, seed=0):
        self.records, self.input_size, self.flip_pairs, self.upper_ids = records, input_size, flip_pairs, upper_ids
        self.train, self.scale_factor, self.rot_factor, self.flip = train, scale_factor, rot_factor, flip
        self.half_body_prob, self.half_body_min_joints, self.seed = half_body_prob, half_body_min_joints, seed
        self.aspect_ratio = input_size[0] / input_size[1]
        self.epoch = 0
        perm = list(range(len(records[0]["joints"]))) if records else []
        for a, b in flip_pairs:
            perm[a], perm[b] = b, a
        self.flip_perm = perm

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        center, scale, rot, flip = r["center"], r["scale"], 0.0, False
        joints, visible = r["joints"], r["visible"]
        # the raw COCO flag (2 visible, 1 occluded, 0 unlabeled); readers without one: labeled = visible
        vis_flag = r.get("vis_flag", 2 * visible)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if (visible > 0).sum() > self.half_body_min_joints and rng.random() < self.half_body_prob:
                half = half_body_center_scale(joints, visible, self.upper_ids, self.aspect_ratio, rng)
                if half is not None:
                    center, scale = half
            # HRNet's draws: scale ~ clip(N(1, sf), 1 ± sf); rotation with p 0.6 from a normal clipped
            # at twice its σ (paper silent on the law; the paper's ±rf is that clip)
            scale = scale * np.clip(rng.standard_normal() * self.scale_factor + 1,
                                    1 - self.scale_factor, 1 + self.scale_factor)
            if rng.random() <= 0.6:
                rot = float(np.clip(rng.standard_normal() * self.rot_factor / 2, -self.rot_factor, self.rot_factor))
            flip = self.flip and rng.random() <= 0.5
        img, (width, _) = load_image(r["image"], scale=self.input_size[0] / scale[0])
        m = affine_matrix(center, scale, rot, self.input_size, flip=flip, image_width=width)
        m_img = m
        if img.width != width:  # a reduced JPEG decode: its pixel i covers file pixels [k·i, k·i + k)
            k = 2 ** round(math.log2(width / img.width))  # 2, 4 or 8 (img.width is rounded up)
            m_img = m @ np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]])
        crop = warp_image(img, m_img, self.input_size)
        joints = apply_affine(joints, m).astype(np.float32)
        if flip:
            joints, visible, vis_flag = joints[self.flip_perm], visible[self.flip_perm], vis_flag[self.flip_perm]
        return {"image": to_tensor_uint8(crop), "joints": torch.from_numpy(joints),
                "visible": torch.from_numpy(np.ascontiguousarray(visible, dtype=np.float32)),
                "vis_flag": torch.from_numpy(np.ascontiguousarray(vis_flag, dtype=np.float32)),
                "center": torch.from_numpy(np.asarray(center, np.float32)),
                "scale": torch.from_numpy(np.asarray(scale, np.float32)), "index": i}
