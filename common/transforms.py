"""Top-down crop geometry: person box -> (center, scale), one affine matrix per sample.

`scale` here is the crop's (w, h) in image pixels (HRNet stores it divided by 200; the geometry
is identical). The crop keeps the network input's aspect ratio and pads the box by 1.25.
The affine maps image pixels to input pixels exactly like HRNet's get_affine_transform: the
center goes to (W/2, H/2), the crop width to W, rotated by `rot` degrees; a flip mirrors the
image first (x -> width - 1 - x), so the same matrix moves the pixels and the joints alike.
"""
import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def box_to_center_scale(box, aspect_ratio, padding=1.25):
    """COCO box (x, y, w, h) -> center and (w, h) of a crop with aspect ratio w/h, padded."""
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float32) * padding


def affine_matrix(center, scale, rot, output_size, flip=False, image_width=None):
    """2x3 matrix from image pixels to output pixels (output_size = (w, h)).

    HRNet's three-point construction reduces to: out = s·R(-rot)·(p - center) + (w/2, h/2) with
    s = w / scale_w. With `flip`, the image is mirrored first (x -> image_width - 1 - x)."""
    if flip:  # the crop centre moves with the mirrored image
        center = (image_width - 1.0 - center[0], center[1])
    s = output_size[0] / scale[0]
    r = math.radians(rot)
    cos, sin = math.cos(r) * s, math.sin(r) * s
    a = np.array([[cos, sin], [-sin, cos]], dtype=np.float64)
    t = (np.array([output_size[0] * 0.5,
                   output_size[1] * 0.5]) - a @ np.asarray(center, dtype=np.float64))
    m = np.concatenate([a, t[:, None]], axis=1)
    if flip:
        mirror = np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        m = m @ mirror
    return m


def invert_affine(m):
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply_affine(points, m):
    """points (..., 2) -> (..., 2) under a 2x3 matrix."""
    return points @ m[:, :2].T + m[:, 2]


def warp_image(img, m, output_size):
    """Crop/rotate/scale a PIL image with the 2x3 matrix (image -> output), bilinear, black border.

    HRNet uses cv2.warpAffine with the same matrix; PIL wants the inverse (output -> image), and
    samples at pixel centres, hence the half-pixel shifts around it."""
    inv = np.vstack([invert_affine(m), [0, 0, 1]])
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    # cv2 puts pixel i's centre at i, PIL at i + 0.5: conjugate the map by that half-pixel shift
    inv = half @ inv @ np.linalg.inv(half)
    return img.transform(tuple(output_size), Image.AFFINE, data=inv[:2].reshape(-1).tolist(),
                         resample=Image.BILINEAR)


def to_tensor_uint8(img):
    """PIL RGB -> uint8 CHW tensor. Loaders pass bytes; `normalize` makes floats a batch at a time
    on the training device (4x less to move between processes, no per-sample float math)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def normalize(x, bgr=False):
    """uint8 RGB images (N, 3, H, W) -> float32, ImageNet-normalised. With `bgr`, the channels
    are reversed first, as the official SimpleBaseline/SimMRPose code feeds cv2's BGR images."""
    if bgr:
        x = x.flip(1)
    mean = torch.tensor(IMAGENET_MEAN * 255, device=x.device).view(1, 3, 1, 1)
    inv_std = torch.tensor(1 / (IMAGENET_STD * 255), device=x.device).view(1, 3, 1, 1)
    # in place: one fresh buffer, not three
    return x.to(torch.float32, copy=True).sub_(mean).mul_(inv_std)


def half_body_center_scale(joints, visible, upper_ids, aspect_ratio, rng):
    """HRNet's half-body augmentation: a box around the upper or the lower body, scaled by 1.5.

    Returns (center, scale) or None when too few joints are labeled on the chosen half."""
    labeled = visible > 0
    upper = [j for j in range(len(joints)) if labeled[j] and j in upper_ids]
    lower = [j for j in range(len(joints)) if labeled[j] and j not in upper_ids]
    # HRNet draws randn() < 0.5 (not rand), so the upper body is chosen about 69% of the time
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None
    pts = joints[chosen]
    center = pts.mean(axis=0).astype(np.float32)
    w, h = pts.max(axis=0) - pts.min(axis=0)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float32) * 1.5


def heatmap_to_image(coords, center, scale, heatmap_size):
    """Back-project (B, K, 2) heatmap coordinates to image pixels (rotation-free test crops).

    The inverse of affine_matrix(center, scale, 0, heatmap_size), as HRNet's transform_preds."""
    factor = scale[:, 0:1, None] / heatmap_size[0]
    half = coords.new_tensor([heatmap_size[0] * 0.5, heatmap_size[1] * 0.5])
    return (coords - half) * factor + center[:, None, :]
