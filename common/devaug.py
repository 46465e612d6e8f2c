"""The data path split between loader workers and the training device (fewer CPU cores per GPU).

Self-supervised views: workers decode and cut the random resized crop and flip (uint8); the
photometric part of MoCo v2 (common/ssl.py's laws) runs a batch at a time on --aug-device with
torchvision's tensor ops. Top-down crops (--data-device): workers send the JPEG bytes and the drawn
matrix (JpegCrops); `warp_crops` cuts them with grid_sample, sampling as PIL does."""
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from common.datasets import TopDownDataset
from common.ssl import (BLUR_SIGMA, CROP_RATIO, CROP_SCALE, JITTER, P_BLUR, P_FLIP, P_GRAY,
                        P_JITTER)
from common.transforms import (IMAGENET_MEAN, IMAGENET_STD, affine_matrix, invert_affine,
                               to_tensor_uint8)
from common.utils import UserError

AUG_DEVICES = ["auto", "workers", "cpu", "cuda"]
AUG_DEVICE_HELP = ("where MoCo v2's colour/grayscale/blur run: workers (per image, PIL: the MoCo "
                   "v2 code), cpu or cuda (a batch at a time in the training process; workers only "
                   "crop and flip); auto: the training device on CUDA, workers on the CPU")


def resolve_aug_device(choice, device):
    """--aug-device -> None (the per-image path in the workers) or the device of the batched
    photometric part."""
    if choice == "auto":
        return device if device.type == "cuda" else None
    if choice == "workers":
        return None
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--aug-device cuda: no CUDA device here (use --aug-device cpu or workers)")
    return device if choice == device.type else torch.device(choice)


# ----------------------------------------------------------------------------------------------
# Worker half: crop and flip, uint8

def crop_flip(img, size, scale=CROP_SCALE, ratio=CROP_RATIO):
    """One view's geometry, drawn as torchvision's RandomResizedCrop then RandomHorizontalFlip:
    (uint8 CHW view, tensor [top, left, height, width, flip]). The flip comes before the colour
    here, after it in MoCo v2: every photometric op is per pixel or a mirror-symmetric blur with
    symmetric borders, so the order does not change the view."""
    top, left, h, w = T.RandomResizedCrop.get_params(img, scale=scale, ratio=ratio)
    view = TF.resized_crop(img, top, left, h, w, [size, size])
    flip = bool(torch.rand(1) < P_FLIP)
    if flip:
        view = TF.hflip(view)
    return to_tensor_uint8(view), torch.tensor([top, left, h, w, float(flip)])


class CropFlip:
    """A transform for mscl.py's TwoViews: the uint8 view alone."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        return crop_flip(img, self.size)[0]


class CropFlipPairs(torch.utils.data.Dataset):
    """LiftedCL's two views of `source(i)` (a PIL image), cut in the worker: (view1, view2, geom1,
    geom2)."""

    def __init__(self, source, length, size):
        self.source, self.length, self.size = source, length, size

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img = self.source(i)
        (v1, g1), (v2, g2) = crop_flip(img, self.size), crop_flip(img, self.size)
        return v1, v2, g1, g2


# ----------------------------------------------------------------------------------------------
# Device half: the photometric ops, batched, one factor per image (torchvision's tensor functional)

def _per_image(f, x):
    return f.to(x.device, x.dtype).view(-1, 1, 1, 1)


def grayscale(x):
    """(B, 3, H, W) in [0, 1] -> its luma, 3 channels (ITU-R 601-2, torchvision's weights)."""
    gray = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return gray.expand_as(x)


def _blend(x, other, f):
    """f·x + (1 - f)·other, clipped to [0, 1] (torchvision's _blend, in one pass)."""
    return torch.lerp(other.expand_as(x), x, _per_image(f, x)).clamp_(0, 1)


def adjust_brightness(x, f):
    return (x * _per_image(f, x)).clamp_(0, 1)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def adjust_hue(x, f):
    """Rotate the hue by f turns (f in [-0.5, 0.5]), keeping HSV's value and saturation: the closed
    form c = V - V·S·clamp(min(k, 4 - k), 0, 1), k = (n + 6·H) mod 6, n = 5, 3, 1 for r, g, b."""
    v = x.amax(dim=1, keepdim=True)
    c = v - x.amin(dim=1, keepdim=True)  # chroma V·S
    safe = torch.where(c > 0, c, torch.ones_like(c))
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    h = torch.where(v == r, (g - b) / safe,
                    torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 6 * _per_image(f, x), 6)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device,
                                     dtype=x.dtype).view(1, 3, 1, 1) + h, 6)
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur, σ per image (pixels), kernel radius ceil(3σ), edge pixels repeated
    (as PIL's GaussianBlur, which approximates the Gaussian by three box blurs)."""
    b, c, hgt, wid = x.shape
    radius = int(np.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2) * (t.abs() <= torch.ceil(3 * s))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, hgt, wid)


# torchvision's fn_idx order
JITTER_OPS = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]


def draw_appearance(n, generator=None):
    """The per-image draws of MoCo v2's photometric part for n images, on the CPU (the same stream
    whatever --aug-device): torchvision's laws, U(1 ± 0.4) for brightness, contrast and saturation,
    U(±0.1) for hue, a uniform random order of the four, σ ~ U(0.1, 2)."""
    u = lambda lo, hi: torch.empty(n).uniform_(lo, hi, generator=generator)
    b, c, s, h = JITTER
    return dict(jitter=torch.rand(n, generator=generator) < P_JITTER,
                order=torch.rand(n, 4, generator=generator).argsort(1),
                factors=torch.stack([u(1 - b, 1 + b), u(1 - c, 1 + c), u(1 - s, 1 + s), u(-h, h)],
                                    1),
                gray=torch.rand(n, generator=generator) < P_GRAY,
                blur=torch.rand(n, generator=generator) < P_BLUR,
                sigma=u(*BLUR_SIGMA))


def _apply_to(x, mask, op, *per_image):
    idx = mask.nonzero().squeeze(1).to(x.device)
    if idx.numel():
        x[idx] = op(x[idx], *(p[mask] for p in per_image))
    return x


def apply_appearance(x, draws):
    """Float images (B, 3, H, W) in [0, 1] through the drawn jitter (each image its own order),
    grayscale and blur, in MoCo v2's order."""
    x = x.clone()
    for position in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            mask = draws["jitter"] & (draws["order"][:, position] == op_id)
            x = _apply_to(x, mask, op, draws["factors"][:, op_id])
    x = _apply_to(x, draws["gray"], grayscale)
    return _apply_to(x, draws["blur"], gaussian_blur, draws["sigma"])


class BatchAppearance:
    """The photometric half on `device`: uint8 views (B, 3, H, W) -> ImageNet-normalised float32
    views."""

    def __init__(self, device):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, views):
        x = views.to(self.device, non_blocking=True).float().div_(255)
        x = apply_appearance(x, draw_appearance(len(x)))
        return x.sub_(self.mean).div_(self.std)


# ----------------------------------------------------------------------------------------------
# Top-down crops: common/transforms.warp_image as affine_grid + grid_sample

def warp_crops(images, matrices, output_size):
    """Person crops of a batch: images a list of uint8 (3, H, W) tensors (any sizes, one device),
    matrices (B, 2, 3) image -> output pixels (common/transforms.affine_matrix, cv2's pixel centres
    at integers), output_size (w, h). Returns float (B, 3, h, w) in [0, 255], sampled as PIL's
    bilinear Image.transform: a point inside an image (within half a pixel of its edge pixels'
    centres) is interpolated with the edge pixels repeated, a point outside it is black."""
    w_out, h_out = output_size
    hmax, wmax = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    # one batch: each image padded to the largest by repeating its edges, which the mask below
    # black-fills
    batch = torch.stack([F.pad(im[None].float(), (0, wmax - im.shape[2], 0, hmax - im.shape[1]),
                               mode="replicate")[0] for im in images])
    inv = torch.stack([torch.as_tensor(np.vstack([invert_affine(np.asarray(m, np.float64)),
                                                  [0, 0, 1]]))
                       for m in matrices])
    # align_corners=False normalisation: pixel centre i -> (2i + 1) / n - 1
    norm_in = torch.tensor([[2 / wmax, 0, 1 / wmax - 1], [0, 2 / hmax, 1 / hmax - 1], [0, 0, 1]],
                           dtype=torch.float64)
    norm_out = torch.tensor([[2 / w_out, 0, 1 / w_out - 1], [0, 2 / h_out, 1 / h_out - 1],
                             [0, 0, 1]],
                            dtype=torch.float64)
    theta = (norm_in @ inv @ torch.linalg.inv(norm_out))[:, :2].to(batch.device, torch.float32)
    grid = F.affine_grid(theta, [len(images), 3, h_out, w_out], align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # back to each image's pixels (cv2 centres): inside means [-0.5, size - 0.5) on both axes
    px = (grid[..., 0] + 1) * (wmax / 2) - 0.5
    py = (grid[..., 1] + 1) * (hmax / 2) - 0.5
    sizes = torch.tensor([[im.shape[2], im.shape[1]] for im in images], device=batch.device,
                         dtype=grid.dtype)
    inside = ((px >= -0.5) & (px < sizes[:, 0, None, None] - 0.5) & (py >= -0.5)
              & (py < sizes[:, 1, None, None] - 0.5))
    return out * inside[:, None]


# ----------------------------------------------------------------------------------------------
# --data-device: the top-down scripts' workers read JPEG bytes; decode and crop run a batch at a
#   time

DATA_DEVICES = ["workers", "cpu", "cuda"]
DATA_DEVICE_HELP = ("where training crops are decoded and cut: workers (per image, PIL, with the "
                    "reduced-size JPEG decode), cpu or cuda (a batch at a time in the training "
                    "process, torchvision.io.decode_jpeg at full size and affine_grid + "
                    "grid_sample; the workers only read bytes and draw the geometry)")


def resolve_data_device(choice):
    """--data-device -> None (the per-image path) or the device that decodes and crops."""
    if choice == "workers":
        return None
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--data-device cuda: no CUDA device here (use --data-device cpu or "
                        "workers)")
    return torch.device(choice)


class JpegCrops(TopDownDataset):
    """TopDownDataset's training items with "jpeg" (the file's bytes) and "matrix" (image -> crop,
    at the file's full size) in place of "image": the same draws (TopDownDataset.draw) and labels,
    so the joints, flags, centres, scales and ids are identical; decode_crops makes the image."""

    def __getitem__(self, i):
        i, key = i if isinstance(i, tuple) else (i, (i,))  # as TopDownDataset: PairedDataset's key
        r = self.records[i]
        center, scale, rot, flip = self.draw(r, key)
        data, width = read_jpeg(r["image"])
        m = affine_matrix(center, scale, rot, self.input_size, flip=flip, image_width=width)
        return {"jpeg": data, "matrix": torch.from_numpy(m),
                **self.labels(r, i, m, flip, center, scale)}


def read_jpeg(path):
    """(the file's bytes as a uint8 tensor, its width from the header), or a one-line error."""
    try:
        with Image.open(path) as img:
            width, fmt = img.size[0], img.format
        data = torchvision.io.read_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (OSError, RuntimeError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable image ({e})") from None
    if fmt != "JPEG":
        raise UserError(f"{path}: {fmt} image; --data-device decodes JPEGs only (use --data-device "
                        f"workers)")
    return data, width


def collate_jpeg(items):
    """default_collate, except that the JPEGs (of different lengths) stay a list."""
    if isinstance(items[0], dict):
        return {k: [it[k] for it in items] if k == "jpeg" else collate_jpeg([it[k] for it in items])
                for k in items[0]}
    return torch.utils.data.default_collate(items)


def decode_crops(batch, device, output_size):
    """A batch of JpegCrops items (at any depth of nested dicts) -> its uint8 "image" crops on
    `device`: decode_jpeg (nvJPEG on CUDA, batched), then warp_crops with the items' matrices."""
    if "jpeg" in batch:
        images = decode_jpeg(batch.pop("jpeg"), mode=ImageReadMode.RGB, device=device)
        crops = warp_crops(images, batch.pop("matrix"), output_size)
        batch["image"] = crops.round_().clamp_(0, 255).to(torch.uint8)  # as PIL's 8-bit crops
    for k, v in batch.items():
        if isinstance(v, dict):
            batch[k] = decode_crops(v, device, output_size)
    return batch
