"""MoCo v2's augmentation (facebookresearch/moco main_moco.py, --aug-plus), shared by the
self-supervised scripts: mscl.py uses it whole, liftedcl.py its photometric part around its own
geometry (it needs the crop box and the flip back)."""
import random

import torchvision.transforms as T
from PIL import ImageFilter

IMAGENET_NORMALIZE = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
# MoCo v2's photometric law, shared with the batched version (common/devaug.py)
CROP_SCALE, CROP_RATIO, P_FLIP = (0.2, 1.0), (3 / 4, 4 / 3), 0.5  # RandomResizedCrop, flip
JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
P_JITTER, P_GRAY, P_BLUR = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)


class GaussianBlur:
    """MoCo v2's blur: PIL Gaussian blur with σ drawn uniformly from [0.1, 2] (pixels)."""

    def __init__(self, sigma=BLUR_SIGMA):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def moco_v2_appearance():
    """The photometric part, in MoCo v2's order: colour jitter (p 0.8), grayscale (p 0.2), blur (p
    0.5)."""
    return T.Compose([
        T.RandomApply([T.ColorJitter(*JITTER)], p=P_JITTER),
        T.RandomGrayscale(p=P_GRAY),
        T.RandomApply([GaussianBlur(BLUR_SIGMA)], p=P_BLUR),
    ])


def moco_v2_augmentation(size):
    """The whole view: random resized crop (scale 0.2-1), photometric part, flip, normalised
    tensor."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
        moco_v2_appearance(),
        T.RandomHorizontalFlip(P_FLIP),
        T.ToTensor(),
        IMAGENET_NORMALIZE,
    ])
