"""Dataset readers (COCO keypoints, MPII in the HRNet json layout, CrowdPose, AI Challenger, image
folders) returning person records {image, image_id, center, scale, joints (K, 2), visible (K,),
area, score} with what they skipped, and the top-down dataset built on them."""
import contextlib
import io
import math
import os

import numpy as np
import torch
from PIL import Image

from common.transforms import (affine_matrix, apply_affine, box_to_center_scale,
                               half_body_center_scale, to_tensor_uint8, warp_image)
from common.utils import UserError, load_json

COCO_JOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
               "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_FLIP_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
COCO_UPPER = list(range(11))
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]

MPII_JOINTS = ["r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
               "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder",
               "l_elbow", "l_wrist"]
MPII_FLIP_PAIRS = [(0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)]
MPII_UPPER = [7, 8, 9, 10, 11, 12, 13, 14, 15]
MPII_SKELETON = [(0, 1), (1, 2), (2, 6), (3, 6), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (10, 11),
                 (11, 12), (12, 7), (13, 7), (13, 14), (14, 15)]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def check_image_dir(image_dir):
    """The folder exists and holds something: an empty one (a failed copy or mount) would otherwise
    surface as the first annotated image missing."""
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory not found")
    with os.scandir(image_dir) as entries:
        if next(entries, None) is None:
            raise UserError(f"{image_dir}: image folder is empty")


def load_coco(ann_file, image_info=False):
    """pycocotools COCO object for a keypoint json (read once), with a one-line error for a bad
    file. With `image_info`, an image list without annotations (image_info_test-dev2017.json) is
    accepted too."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = load_json(os.fspath(ann_file), "annotation file")
    if not isinstance(coco.dataset, dict) or "images" not in coco.dataset:
        raise UserError(f"{ann_file}: not a COCO annotation file (needs 'images' and "
                        f"'annotations')")
    if "annotations" not in coco.dataset and not image_info:
        raise UserError(f"{ann_file}: no 'annotations' (an image-info file such as test-dev needs "
                        f"--det-json)")
    missing_area = [a.get("id") for a in coco.dataset.get("annotations", []) if "area" not in a]
    # COCOeval's OKS divides by the GT area; without it pycocotools dies with a bare KeyError
    if missing_area:
        raise UserError(f"{ann_file}: annotation id {missing_area[0]} has no 'area' (OKS needs it)")
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints "creating index..."
        coco.createIndex()
    return coco


def read_coco(coco, image_dir, aspect_ratio, image_ids=None, det_json=None, det_thresh=0.0):
    """Person records of a COCO keypoint set: ground-truth boxes, or detections from `det_json`.

    Ground truth skips crowd regions, degenerate boxes and persons without a labeled joint (they
    give no training signal and COCOeval ignores them). Returns (records, skipped counts)."""
    check_image_dir(image_dir)
    image_ids = sorted(coco.getImgIds()) if image_ids is None else image_ids
    # image-info files list categories without keypoints
    k = len(coco.cats.get(1, {}).get("keypoints", [None] * 17))
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
            records.append(dict(image=os.path.join(image_dir, info["file_name"]),
                                image_id=d["image_id"], center=center, scale=scale,
                                joints=np.zeros((k, 2), np.float32),
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


MPII_KEYS = ("image", "center", "scale", "joints", "joints_vis")


def check_mpii_person(a, i, ann_file, keys=MPII_KEYS):
    """One person of an HRNet-format MPII list has every key read from it: a one-line error
    otherwise."""
    missing = [k for k in keys if not isinstance(a, dict) or k not in a]
    if missing:
        raise UserError(f"{ann_file}: person {i} has no {', '.join(repr(k) for k in missing)} "
                        f"(the HRNet MPII layout gives every person {', '.join(MPII_KEYS)})")


def read_mpii(ann_file, image_dir, aspect_ratio):
    """Records of an MPII annotation file in the HRNet layout (annot/train.json, annot/valid.json).

    As HRNet: the centre moves down by 15·scale and the box grows by 1.25 to keep the limbs, and the
    Matlab 1-based coordinates become 0-based. `scale` (in units of 200 px) becomes pixels."""
    annotations = load_json(ann_file, "MPII annotation file")
    if not isinstance(annotations, list) or (annotations and "joints" not in annotations[0]):
        raise UserError(f"{ann_file}: not an MPII annotation list in the HRNet format")
    check_image_dir(image_dir)
    records, skipped = [], {"no_joints": 0}
    for i, a in enumerate(annotations):
        check_mpii_person(a, i, ann_file)
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
                            scale=np.array([w, h], np.float32) * 1.25, joints=joints,
                            visible=visible, area=float(w * h * 1.5625), score=1.0, annotation=i))
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


# the official law's constants (SimpleBaseline/HRNet JointsDataset); the run plan describes them
P_ROTATION, P_FLIP, HALF_BODY_MIN_JOINTS = 0.6, 0.5, 8


def draw_scale_rotation(rng, scale_factor, rot_factor):
    """The official law (SimpleBaseline/SimMRPose/HRNet JointsDataset, in their order of draws):
    scale factor from N(1, sf) clipped to 1 ± sf; rotation with probability 0.6 from N(0, rf)
    clipped to ±2·rf, else 0."""
    factor = float(np.clip(rng.standard_normal() * scale_factor + 1, 1 - scale_factor,
                           1 + scale_factor))
    rot = (float(np.clip(rng.standard_normal() * rot_factor, -2 * rot_factor, 2 * rot_factor))
           if rng.random() <= P_ROTATION else 0.0)
    return factor, rot


class TopDownDataset(torch.utils.data.Dataset):
    """Person crops for top-down pose: one affine per sample moves pixels and joints together.

    Training draws (half-body, scale, rotation, flip) of sample i in epoch e come from (seed, e, i):
    the same run whatever the workers and after a resume; `dataset[i, key]` draws from (seed, e,
    *key) for a caller that reads a sample twice an epoch (common.semi.PairedDataset)."""

    def __init__(self, records, input_size, flip_pairs, upper_ids, train=False, scale_factor=0.35,
                 rot_factor=30.0, flip=True, half_body_prob=0.0,
                 half_body_min_joints=HALF_BODY_MIN_JOINTS, seed=0):
        self.records, self.input_size, self.flip_pairs, self.upper_ids = (records, input_size,
                                                                          flip_pairs, upper_ids)
        self.train, self.scale_factor, self.rot_factor, self.flip = (train, scale_factor,
                                                                     rot_factor, flip)
        self.half_body_prob, self.half_body_min_joints, self.seed = (half_body_prob,
                                                                     half_body_min_joints, seed)
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

    def draw(self, r, key):
        """The crop of record `r`: (center, scale, rotation, flip), drawn from (seed, epoch, key)
        when training (HRNet's order: half body, scale and rotation, flip), else the box itself."""
        center, scale, rot, flip = r["center"], r["scale"], 0.0, False
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, *key])
            visible = r["visible"]
            if ((visible > 0).sum() > self.half_body_min_joints
                and rng.random() < self.half_body_prob):
                half = half_body_center_scale(r["joints"], visible, self.upper_ids,
                                              self.aspect_ratio, rng)
                if half is not None:
                    center, scale = half
            factor, rot = draw_scale_rotation(rng, self.scale_factor, self.rot_factor)
            scale = scale * factor
            flip = self.flip and rng.random() <= P_FLIP
        return center, scale, rot, flip

    def labels(self, r, i, m, flip, center, scale):
        """Everything of item i but its image: joints through the crop's matrix `m`, flags swapped
        with the joints under a flip, the crop's box and the person's id."""
        joints, visible = apply_affine(r["joints"], m).astype(np.float32), r["visible"]
        # the raw COCO flag (2 visible, 1 occluded, 0 unlabeled); readers without one: labeled =
        # visible
        vis_flag = r.get("vis_flag", 2 * visible)
        if flip:
            joints, visible, vis_flag = (joints[self.flip_perm], visible[self.flip_perm],
                                         vis_flag[self.flip_perm])
        return {"joints": torch.from_numpy(joints),
                "visible": torch.from_numpy(np.ascontiguousarray(visible, dtype=np.float32)),
                "vis_flag": torch.from_numpy(np.ascontiguousarray(vis_flag, dtype=np.float32)),
                "center": torch.from_numpy(np.asarray(center, np.float32)),
                "scale": torch.from_numpy(np.asarray(scale, np.float32)), "index": i,
                # the person's id: its index in the training list unless the record carries one
                # (common.semi)
                "pid": torch.tensor(r.get("pid", i), dtype=torch.int64)}

    def __getitem__(self, i):
        # i, or (i, key): the draws come from (seed, epoch, key), key = i by default (PairedDataset
        # gives its own)
        i, key = i if isinstance(i, tuple) else (i, (i,))
        r = self.records[i]
        center, scale, rot, flip = self.draw(r, key)
        img, (width, _) = load_image(r["image"], scale=self.input_size[0] / scale[0])
        m = affine_matrix(center, scale, rot, self.input_size, flip=flip, image_width=width)
        m_img = m
        # a reduced JPEG decode: its pixel i covers file pixels [k·i, k·i + k)
        if img.width != width:
            k = 2 ** round(math.log2(width / img.width))  # 2, 4 or 8 (img.width is rounded up)
            m_img = m @ np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]])
        crop = warp_image(img, m_img, self.input_size)
        return {"image": to_tensor_uint8(crop), **self.labels(r, i, m, flip, center, scale)}


# --------------------------------------------------------------------------------------------------
# CrowdPose (Li et al. 2019): COCO-like json, 14 joints, a crowd index per image, no 'area'

CROWDPOSE_JOINTS = ["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
                    "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
                    "right_ankle", "head", "neck"]
CROWDPOSE_FLIP_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
CROWDPOSE_UPPER = [0, 1, 2, 3, 4, 5, 12, 13]
# the json's own 'skeleton' is COCO's 17-joint one (indices up to 17): drawn here from the joint
# names instead
CROWDPOSE_SKELETON = [(10, 8), (8, 6), (11, 9), (9, 7), (6, 7), (0, 6), (1, 7), (0, 1), (0, 2),
                      (1, 3), (2, 4), (3, 5), (12, 13), (0, 13), (1, 13)]
# crowdposetools' computeOks: COCO's limb sigmas, head and neck as the shoulders
CROWDPOSE_SIGMAS = [.079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089, .079,
                    .079]
# crowdposetools' OKS scale: 0.53 x GT box w x h replaces COCO's segmentation area (computeOks and
# evaluateImg)
CROWDPOSE_AREA_FACTOR = 0.53


def check_crowdpose(dataset, name):
    """Checks a CrowdPose annotation dict and sets each person's 'area' to the OKS area of
    crowdposetools, in place (it ignores any area in the file): COCOeval then computes the official
    OKS."""
    for img in dataset["images"]:
        if not isinstance(img.get("crowdIndex"), (int, float)):
            raise UserError(f"{name}: image id {img.get('id')} has no numeric 'crowdIndex' "
                            f"(not a CrowdPose annotation file?)")
    for a in dataset["annotations"]:
        missing = [f for f in ("image_id", "bbox", "keypoints", "num_keypoints", "iscrowd")
                   if f not in a]
        if missing:
            raise UserError(f"{name}: annotation id {a.get('id')} has no '{missing[0]}'")
        if len(a["keypoints"]) != 3 * len(CROWDPOSE_JOINTS):
            raise UserError(f"{name}: annotation id {a.get('id')} has {len(a['keypoints'])} "
                            f"keypoint values, expected {3 * len(CROWDPOSE_JOINTS)} (14 CrowdPose "
                            f"joints)")
        a["area"] = CROWDPOSE_AREA_FACTOR * a["bbox"][2] * a["bbox"][3]


def load_crowdpose(ann_file):
    """pycocotools COCO object of an official CrowdPose json: images carry 'crowdIndex', persons
    the official toolkit's OKS area (check_crowdpose)."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = load_json(os.fspath(ann_file), "annotation file")
    if (not isinstance(coco.dataset, dict) or "annotations" not in coco.dataset
        or "images" not in coco.dataset):
        raise UserError(f"{ann_file}: not a CrowdPose annotation file (needs 'images' and "
                        f"'annotations')")
    check_crowdpose(coco.dataset, ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------------
# AI Challenger (Wu et al. 2017) persons, for unlabeled crops (SSPose / MSCL MPII+AIC: boxes only)

AIC_JOINTS = ["right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
              "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
              "left_ankle", "head_top", "neck"]


def read_aic(ann_file, image_dir, aspect_ratio):
    """(records, skipped) of AI Challenger persons, for unlabeled crops: the official list of
    {image_id, human_annotations, keypoint_annotations} (v 1 visible, 2 occluded, 3 unlabeled) or
    mmpose's COCO-style json; boxes under 1 px are skipped."""
    data = load_json(ann_file, "AIC annotation file")
    check_image_dir(image_dir)
    k = len(AIC_JOINTS)

    def joints(kp, image_id, official):
        """(K, 2) coordinates and (K,) labeled flags of a flat 3K list (None: a person without
        keypoints)."""
        if kp is None:
            return np.zeros((k, 2), np.float32), np.zeros(k, np.float32)
        if len(kp) != 3 * k:
            raise UserError(f"{ann_file}: image {image_id} has a person with {len(kp)} keypoint "
                            f"values, expected {3 * k} (14 AIC joints)")
        kp = np.asarray(kp, dtype=np.float32).reshape(k, 3)
        # official v: 3 = unlabeled; COCO v: 0
        labeled = (kp[:, 2] < 3) if official else (kp[:, 2] > 0)
        return kp[:, :2].copy(), labeled.astype(np.float32)

    persons = []  # (image path, image_id, box (x, y, w, h), joints, visible)
    if (isinstance(data, list) and all(isinstance(e, dict) and "human_annotations" in e
                                       for e in data[:1])):
        for e in data:
            if (not isinstance(e, dict) or "image_id" not in e
                or not isinstance(e.get("human_annotations"), dict)):
                raise UserError(f"{ann_file}: entry {str(e)[:60]} is not an AIC image (needs "
                                f"image_id, human_annotations)")
            keypoints = e.get("keypoint_annotations") or {}
            for human, box in e["human_annotations"].items():
                if not (isinstance(box, list) and len(box) == 4):
                    raise UserError(f"{ann_file}: image {e['image_id']} {human}: box "
                                    f"{str(box)[:40]} is not [x1, y1, x2, y2]")
                x1, y1, x2, y2 = box
                persons.append((os.path.join(image_dir, f"{e['image_id']}.jpg"), e["image_id"],
                                (x1, y1, x2 - x1, y2 - y1),
                                *joints(keypoints.get(human), e["image_id"], True)))
    elif (isinstance(data, dict) and isinstance(data.get("images"), list)
          and isinstance(data.get("annotations"), list)):
        files = {img["id"]: img["file_name"] for img in data["images"]}
        for a in data["annotations"]:
            if a.get("image_id") not in files or len(a.get("bbox", ())) != 4:
                raise UserError(f"{ann_file}: annotation id {a.get('id')} needs an image_id of "
                                f"'images' and a bbox [x, y, w, h]")
            if a.get("category_id", 1) != 1 or a.get("iscrowd", 0):
                continue
            persons.append((os.path.join(image_dir, files[a["image_id"]]), a["image_id"],
                            tuple(a["bbox"]), *joints(a.get("keypoints"), a["image_id"], False)))
    else:
        raise UserError(f"{ann_file}: not AI Challenger annotations (expected the official list of "
                        f"{{image_id, human_annotations, keypoint_annotations}} or a COCO-style "
                        f"json)")

    records, skipped = [], {"bad_box": 0}
    for image, image_id, (x, y, w, h), xy, visible in persons:
        if not (w >= 1 and h >= 1):  # also catches NaN
            skipped["bad_box"] += 1
            continue
        center, scale = box_to_center_scale((x, y, w, h), aspect_ratio)
        records.append(dict(image=image, image_id=image_id, center=center, scale=scale, joints=xy,
                            visible=visible, area=float(w * h), score=1.0))
    return records, skipped
