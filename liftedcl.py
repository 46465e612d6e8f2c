"""Lifting Contrastive Learning (LiftedCL, Chen et al., ICLR 2023): human-centric pretraining.

MoCo v2 (momentum key encoder, queue, shuffle BN) with an invariant contrast on the pooled C5 vector
(Eq. 2) and an equivariant one on the C5 maps of the views' shared area (Eq. 4); a lifting network
turns the pooled vector into a 3D skeleton that a KCS discriminator (Eqs. 5-7) tells from skeletons
of a kinematic prior (App. B). The encoder minimises Eq. (1). The ResNet is exported as
`backbone.pth` for `mrpose.py --pretrained` (Table 1 transfer).

    python liftedcl.py --data demo                                  # laptop CPU, minutes
    torchrun --nproc_per_node=4 liftedcl.py --data coco --data-root /data/coco \\
        --pretrained /weights/moco_v2_200ep_pretrain.pth.tar        # stage II (Sec. 4.1)
    python liftedcl.py --lambda-inv 1 --lambda-equiv 0 --lambda-adv 0 --bn-groups 1 --moco-k 4096
        # MoCo v2's builder, exactly, in one process
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.ops import roi_align

from common import dist
from common.backbone import RESNETS, ResNetFeatures, load_backbone
from common.datasets import list_images, load_coco, read_coco, read_image
from common.devaug import (AUG_DEVICE_HELP, AUG_DEVICES, BatchAppearance, CropFlipPairs,
                           resolve_aug_device)
from common.plan import apply_presets, begin, finish_parser, make_plan, moco_v2_views, resume_path
from common.plots import plot_curves, plot_skeletons_3d
from common.ssl import IMAGENET_NORMALIZE, moco_v2_appearance
from common.transforms import affine_matrix, warp_image
from common.utils import (Progress, UserError, autocast, check_finite, compile_model,
                          finish_pretraining, gmacs, load_checkpoint, resume_pretraining,
                          rng_state, run_main, save_checkpoint, seed_everything, write_log)
from data import dataset_root
from data.demo import demo_root

# ----------------------------------------------------------------------------------------------
# Arguments. Paper defaults (Sec. 4.1, App. C) per dataset; `None` means "take the preset of
# --data".

# ImageNet train/ or any folder (--images DIR): whole images, COCO's recipe (paper silent)
WHOLE_IMAGES = dict(backbone="resnet50", crop_size=256, person_size=None, epochs=200, lr=0.03,
                    batch_size=128, moco_k=16384, moco_m=0.999, workers=4)
PRESETS = {
    # COCO person crops (App. A, C): ResNet-50, 256 px views of 192x256 crops, total batch 128 (4
    # GPUs), SGD lr 0.03 x batch/128, cosine, 200 epochs, K = 16384, m = 0.999
    "coco": dict(WHOLE_IMAGES, person_size=(192, 256)),
    "imagenet": WHOLE_IMAGES,
    "folder": WHOLE_IMAGES,
    # demo (not a paper setting): every part of the method in minutes of CPU (README)
    "demo": dict(backbone="resnet18", crop_size=64, person_size=(72, 96), epochs=2, lr=0.12,
                 batch_size=32, moco_k=1024, moco_m=0.99, workers=1, amp="auto"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = " (default: the --data preset)"
    p.add_argument("-a", "--backbone", default=None, choices=list(RESNETS),
                   help="the ResNet" + preset)
    p.add_argument("--pretrained", default=None,
                   help="stage I: a MoCo checkpoint or backbone.pth, 'torchvision' (ImageNet) or "
                        "'none' (scratch, Table 7); required by --data coco/imagenet")
    # model and losses (Sec. 3, App. C)
    p.add_argument("--dim", type=int, default=128, help="output width of both projection heads")
    p.add_argument("--moco-k", type=int, default=None, help="length K of both queues" + preset)
    p.add_argument("--moco-m", type=float, default=None, help="key encoder momentum" + preset)
    p.add_argument("--moco-t", type=float, default=0.2, help="temperature τ of Eqs. (2) and (4)")
    p.add_argument("--lambda-inv", type=float, default=0.5, help="weight of L_inv (λ1 of Eq. 1)")
    p.add_argument("--lambda-equiv", type=float, default=0.5,
                   help="weight of L_equiv (λ1 of Eq. 1; 0: no dense head)")
    p.add_argument("--lambda-adv", type=float, default=0.5,
                   help="weight of L_adv (λ2 of Eq. 1; 0: the lifting network is only watched)")
    p.add_argument("--align-size", type=int, default=16,
                   help="side of the aligned shared area (App. C: 16)")
    p.add_argument("--cell-centres", default="resnet", choices=["resnet", "official"],
                   help="a C5 cell's centre: its receptive field's or its tile's (README)")
    p.add_argument("--normalize-lifted", action=argparse.BooleanOptionalAction, default=True,
                   help="root-centre and Frobenius-normalise lifted skeletons like the real ones")
    p.add_argument("--bn-groups", type=int, default=None,
                   help="shuffle BN's BatchNorm groups per rank (default: 4 / world size, >= 1)")
    p.add_argument("--skeletons", default=None,
                   help="real skeletons: an (N, 17, 3) tensor's file (official: norm_joints.pt)")
    p.add_argument("--prior-size", type=int, default=10000,
                   help="skeletons sampled from the prior (App. B: ~10K)")
    # data (App. A)
    p.add_argument("--data", default="demo", choices=list(PRESETS),
                   help="training images and their preset (table below); demo is generated")
    p.add_argument("--data-root", default=None,
                   help="COCO root (annotations/, train2017/) or ImageNet root (train/) (default: "
                        "data/DATA in the repository)")
    p.add_argument("--images", default=None,
                   help="a folder of images, used whole (any layout; overrides --data-root)")
    p.add_argument("--crop-size", type=int, default=None, help="side of each view" + preset)
    p.add_argument("--person-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="person crops of --data coco/demo" + preset)
    # optimisation (Sec. 4.1, App. C)
    p.add_argument("--epochs", type=int, default=None,
                   help="length of the cosine schedule" + preset)
    p.add_argument("--iters", type=int, default=None,
                   help="stop after this many iterations in total (the schedule spans --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="BASE lr: the effective lr is lr x batch-size / 128" + preset)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (encoder and D)")
    p.add_argument("--weight-decay", "--wd", dest="wd", type=float, default=1e-4,
                   help="SGD weight decay (encoder and D)")
    p.add_argument("--d-lr", type=float, default=0.03, help="discriminator lr, constant")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="total over all ranks" + preset)
    p.add_argument("--aug-device", default="auto", choices=AUG_DEVICES, help=AUG_DEVICE_HELP)
    finish_parser(p, PRESETS, out="runs/liftedcl-DATA-BACKBONE")
    args = p.parse_args(argv)
    apply_presets(args, PRESETS[args.data])
    args.data_root = dataset_root(args, PRESETS)
    if min(args.lambda_inv, args.lambda_equiv, args.lambda_adv) < 0:
        raise UserError("--lambda-inv/--lambda-equiv/--lambda-adv must not be negative")
    if args.data in ("coco", "imagenet") and args.pretrained is None:  # the paper's stage II
        raise UserError(f"--data {args.data} needs --pretrained FILE|torchvision|none: the paper's "
                        f"stage II starts from MoCo v2's 200-epoch ImageNet weights (FILE); none "
                        f"trains from scratch")
    if args.moco_k % args.batch_size:
        raise UserError(f"--moco-k {args.moco_k} must be a multiple of --batch-size "
                        f"{args.batch_size} (MoCo's queue)")
    args.person_size = tuple(args.person_size) if args.person_size else None
    args.out = args.out or os.path.join("runs", f"liftedcl-{args.data}-{args.backbone}")
    args.resume = resume_path(args)
    return args


def run_plan(args):
    """The --dry-run plan and OUT/args.json (common/plan.py), with App. C's lr scaling."""
    plan = make_plan(args, lr_effective=args.lr * args.batch_size / 128,
                     augmentation=dict(moco_v2_views(args), person_size=args.person_size))
    plan["bn_groups"] = args.bn_groups or max(1, 4 // dist.world_size())  # as main() resolves it
    return plan


def print_summary(args):
    """--summary: parameters of the query encoder and lifting network, of D, and the
    multiply-accumulates of one view through the ResNet."""
    model = build_model(args).eval()
    macs = gmacs(model.encoder_q.backbone, (args.crop_size, args.crop_size))
    n = sum(p.numel() for m in (model.encoder_q, model.lifting) for p in m.parameters())
    print(f"LiftedCL {args.backbone} at {args.crop_size} px: {n:,} encoder + lifting parameters "
          f"(the key encoder copies them), {sum(p.numel() for p in Discriminator().parameters()):,}"
          f" in D; {macs:.2f} GFLOPs (multiply-accumulates) per view in the ResNet")


# ----------------------------------------------------------------------------------------------
# Data: COCO person crops (App. A) or whole images, two MoCo v2 views each with their geometry

class TwoViews(torch.utils.data.Dataset):
    """Each item: two views of one image and their crop boxes and flips (top, left, height, width,
    flip) in the pixels of that image (the 192x256 person crop, or the whole image)."""

    def __init__(self, items, crop_size, person_size=None):
        self.items, self.crop_size, self.person_size = items, crop_size, person_size
        self.appearance = moco_v2_appearance()

    def __len__(self):
        return len(self.items)

    def source(self, i):
        item = self.items[i]
        if isinstance(item, str):
            return read_image(item)
        # App. A: the box extended to the crop's aspect ratio (h:w = 4:3), not padded; read_coco
        # pads it by SimpleBaseline's 1.25, which is undone here
        img = read_image(item["image"])
        box = affine_matrix(item["center"], item["scale"] / 1.25, 0.0, self.person_size)
        return warp_image(img, box, self.person_size)

    def __getitem__(self, i):
        img = self.source(i)
        (v1, g1), (v2, g2) = (random_view(img, self.crop_size, self.appearance),
                              random_view(img, self.crop_size, self.appearance))
        return v1, v2, g1, g2


def random_view(img, size, appearance=None):
    """One MoCo v2 view (App. C: random resized crop, scale 0.2-1, colour, grayscale, blur, flip)
    and its geometry (top, left, height, width, flip) for the inverse transformation."""
    top, left, h, w = T.RandomResizedCrop.get_params(img, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    view = TF.resized_crop(img, top, left, h, w, [size, size])
    if appearance is not None:
        view = appearance(view)
    # after the colour, as RandomHorizontalFlip in MoCo v2's pipeline
    flip = bool(torch.rand(1) < 0.5)
    if flip:
        view = TF.hflip(view)
    return IMAGENET_NORMALIZE(TF.to_tensor(view)), torch.tensor([top, left, h, w, float(flip)])


def training_items(args):
    """Person records (--data coco/demo) or image files (--data imagenet/folder, --images DIR)."""
    if args.images:
        return list_images(args.images)
    root = demo_root(args.data_seed) if args.data == "demo" else args.data_root  # data.dataset_root
    if args.data == "imagenet":
        if not os.path.isdir(os.path.join(root, "train")):
            raise UserError(f"{root}: no train folder inside (give --images DIR for another "
                            f"layout)")
        return list_images(os.path.join(root, "train"))
    ann = os.path.join(root, "annotations", "person_keypoints_train2017.json")
    images = os.path.join(root, "train2017")
    images = images if os.path.isdir(images) else os.path.join(root, "images", "train2017")
    # non-crowd persons with at least one labeled keypoint (SimpleBaseline's 149,813 on train2017)
    records, skipped = read_coco(load_coco(ann), images, args.person_size[0] / args.person_size[1])
    if not records:
        raise UserError(f"{ann}: no person with labeled keypoints")
    if dist.is_main():
        print(f"{len(records)} person crops from {ann}; skipped {skipped}")
    return records


def load_skeletons(path):
    """--skeletons FILE: an (N, 17, 3) or (N, 51) tensor of real skeletons, y pointing down;
    root-centred and Frobenius-normalised like the prior's."""
    x = load_checkpoint(path, "skeleton file")
    if (not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[1:].numel() != 51
        or len(x) == 0):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{path}: expected a tensor of skeletons of shape (N, 17, 3), found "
                        f"{shape}")
    x = x.float().reshape(len(x), 17, 3)
    if not torch.isfinite(x).all():
        raise UserError(f"{path}: the skeletons contain NaN or inf")
    return normalize_skeletons(x)


def make_loader(args, per_rank, device, aug_device):
    """The training images as two-view pairs: (loader, its sampler, the batched appearance
    augmentation on `aug_device`, or None where the workers do it all)."""
    items = training_items(args)
    if args.batch_size > len(items):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(items)} training "
                        f"images")
    train_ds = TwoViews(items, args.crop_size, args.person_size)
    if aug_device is not None:  # the workers only crop and flip; BatchAppearance does the rest
        train_ds = CropFlipPairs(train_ds.source, len(train_ds), args.crop_size)
    appearance = BatchAppearance(aug_device) if aug_device is not None else None
    loader, sampler = dist.train_loader(train_ds, per_rank, workers=args.workers, seed=args.seed,
                                        device=device)
    return loader, sampler, appearance


# ----------------------------------------------------------------------------------------------
# Model (Sec. 3, Figs. 2-4, App. C): MoCo v2's builder (mlp=True) with an equivariant head on C5
# and a lifting network on the pooled C5 vector

class Encoder(nn.Module):
    """ResNet, invariant head (GAP, MoCo v2's MLP C-C-ReLU-128) and equivariant head (1x1 convs
    C-C-ReLU-128 on C5, App. C); returns (pooled C5, z, F)."""

    def __init__(self, backbone, dim=128, equivariant=True):
        super().__init__()
        self.backbone = ResNetFeatures(backbone)
        c = self.backbone.channels[3]
        self.inv_head = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, dim))
        self.equiv_head = (nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, dim, 1))
                           if equivariant else None)

    def forward(self, x, groups=1):
        # each BN group is a separate backbone call: the per-GPU batches of shuffle BN (MoCo)
        c5 = (torch.cat([self.backbone(chunk)[3] for chunk in x.chunk(groups)]) if groups > 1
              else self.backbone(x)[3])
        pooled = torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1)
        return (pooled, self.inv_head(pooled), self.equiv_head(c5) if self.equiv_head is not None
                else None)


class LiftingNet(nn.Module):
    """Fig. 4a: the pooled C5 vector -> 17 x 3 joints, root-centred and normalised like the real
    skeletons unless `normalize` is off."""

    def __init__(self, in_dim, width=512, normalize=True):
        super().__init__()
        self.normalize = normalize
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.LeakyReLU(0.2), ResBlock(width),
                                 nn.Linear(width, 3 * len(H36M_JOINTS)))

    def forward(self, pooled):
        x = self.net(pooled).view(-1, len(H36M_JOINTS), 3)
        return normalize_skeletons(x) if self.normalize else x


# C5 of a torchvision ResNet: cell j's receptive field centred on pixel 32 j (--cell-centres resnet)
RESNET_CELL_OFFSET = 0.5 / 32 - 0.5


class LiftedCL(nn.Module):
    """Query encoder, momentum key encoder, lifting network and the two queues; forward gives both
    contrastive losses (Eqs. 2 and 4) and the lifted skeletons of a batch of view pairs."""

    def __init__(self, backbone="resnet50", dim=128, K=16384, m=0.999, T=0.2, equivariant=True,
                 train_lifting=True, normalize_lifted=True, align_size=16, bn_groups=1,
                 cell_offset=RESNET_CELL_OFFSET):
        super().__init__()
        self.K, self.m, self.T, self.align_size, self.bn_groups = K, m, T, align_size, bn_groups
        self.cell_offset = cell_offset
        self.encoder_q = Encoder(backbone, dim, equivariant)
        self.encoder_k = Encoder(backbone, dim, equivariant)
        self.copy_key_encoder()
        self.lifting = LiftingNet(self.encoder_q.backbone.channels[3], normalize=normalize_lifted)
        self.train_lifting = train_lifting
        if not train_lifting:  # --lambda-adv 0: the lifted skeletons are only watched (D, monitor)
            self.lifting.requires_grad_(False)
        self.register_buffer("queue_inv", F.normalize(torch.randn(dim, K), dim=0))
        if equivariant:  # pooled key maps: the negatives t_s- of Eq. (4)
            self.register_buffer("queue_equiv", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def copy_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k, k_pooled):
        k = dist.all_gather_cat(k)
        ptr, n = int(self.queue_ptr), len(k)
        self.queue_inv[:, ptr:ptr + n] = k.T
        if k_pooled is not None:
            self.queue_equiv[:, ptr:ptr + n] = dist.all_gather_cat(k_pooled).T
        self.queue_ptr[0] = (ptr + n) % self.K

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """MoCo's shuffle BN: the key images of all ranks permuted, so that no BN group holds a
        query's own key."""
        world = dist.world_size()
        x_gather = dist.all_gather_cat(x)
        idx_shuffle = torch.randperm(len(x_gather), device=x.device)
        if world > 1:
            torch.distributed.broadcast(idx_shuffle, 0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        return x_gather[idx_shuffle.view(world, -1)[dist.rank()]], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        world = dist.world_size()
        return dist.all_gather_cat(x)[idx_unshuffle.view(world, -1)[dist.rank()]]

    def forward(self, im_q, im_k, geom_q, geom_k):
        """{l_inv, l_equiv (or None), overlap mask, q, lifted skeletons (N, 17, 3)}."""
        pooled, q, q_map = self.encoder_q(im_q, self.bn_groups)
        with torch.no_grad():
            self._momentum_update_key_encoder()  # before the key forward, as MoCo
            shuffle = dist.world_size() * self.bn_groups > 1  # else one BN batch: nothing to do
            if shuffle:
                im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            _, k, k_map = self.encoder_k(im_k, self.bn_groups)
            k = F.normalize(k.float(), dim=1)
            if shuffle:
                k = self._batch_unshuffle_ddp(k, idx_unshuffle)
                k_map = None if k_map is None else self._batch_unshuffle_ddp(k_map, idx_unshuffle)
        lifted = self.lifting(pooled if self.train_lifting else pooled.detach())
        with torch.autocast(im_q.device.type, enabled=False):  # logits and losses in fp32
            q = F.normalize(q.float(), dim=1)
            l_inv = invariant_loss(q, k, self.queue_inv.clone().detach(), self.T)
            l_equiv, valid, k_pooled = None, None, None
            if q_map is not None:
                l_equiv, valid = equivariant_loss(q_map.float(), k_map.float(), geom_q, geom_k,
                                                  self.queue_equiv.clone().detach(), self.T,
                                                  self.align_size, self.cell_offset)
                k_pooled = F.normalize(k_map.float().mean((2, 3)), dim=1)
        self._dequeue_and_enqueue(k, k_pooled)  # after the logits, as MoCo
        return dict(l_inv=l_inv, l_equiv=l_equiv, valid=valid, q=q.detach(), lifted=lifted.float())


def build_model(args):
    """LiftedCL as the arguments say (main, --summary, eval/liftedcl_report.py)."""
    return LiftedCL(args.backbone, args.dim, args.moco_k, args.moco_m, args.moco_t,
                    args.lambda_equiv > 0, args.lambda_adv > 0, args.normalize_lifted,
                    args.align_size, args.bn_groups or 1,
                    RESNET_CELL_OFFSET if args.cell_centres == "resnet" else 0.0)


def load_pretrained(model, spec, backbone):
    """--pretrained (stage I) into the query backbone, then copied to the key encoder. Returns the
    line to print: what was loaded, or that the encoder starts from scratch."""
    if spec in (None, "none"):
        return f"{backbone} from scratch (no stage I)"
    if spec == "torchvision":
        model.encoder_q.backbone.load_state_dict(
            ResNetFeatures(backbone, torchvision_weights=True).state_dict())
        report = f"loaded torchvision's ImageNet {backbone}"
    else:  # a MoCo checkpoint's MLP head (encoder_q.fc.*) is left out: the heads start random
        report = load_backbone(model.encoder_q.backbone, spec)
    model.copy_key_encoder()
    return report + "; the key encoder is its copy; the heads and the lifting network start random"


# ----------------------------------------------------------------------------------------------
# Eq. (1): the encoder's loss, with separate λ for L_inv and L_equiv (Table 8's ablations)

def encoder_loss(out, discriminator, args):
    """λ1 (L_inv + L_equiv) + λ2 L_adv of the model's output `out`. Returns (loss, L_adv)."""
    l_adv = (encoder_adv_loss(discriminator, out["lifted"]) if args.lambda_adv > 0
             else out["lifted"].new_zeros(()))
    loss = args.lambda_inv * out["l_inv"] + args.lambda_adv * l_adv
    if out["l_equiv"] is not None:
        loss = loss + args.lambda_equiv * out["l_equiv"]
    return loss, l_adv


# ----------------------------------------------------------------------------------------------
# Liftable block: LiftedCL's losses, Eqs. (2)-(7), and the kinematic prior of App. B. It needs only
# `import math, torch, torch.nn as nn, torch.nn.functional as F` and `from torchvision.ops import
# roi_align`; every function takes explicit arguments. Copy it from here to the end marker.

# Eq. (2)
def invariant_loss(q, k, queue, t):
    """MoCo's InfoNCE of normalised queries q (N, C): each against its key k+ (the positive, first)
    and the K queued keys, the columns of `queue` (C, K), at temperature t."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long,
                                               device=logits.device))


def align_views(map_q, map_k, geom_q, geom_k, size=16, offset=0.0):
    """Sec. 3.2's inverse geometric augmentation: the area both crops (`geom` rows: top, left,
    height, width, flip) share, cut from each un-flipped map at size x size, a map's cell j centred
    at (j + 0.5 + offset) cells. Returns (aligned q, aligned k, overlap mask)."""
    top, left = torch.maximum(geom_q[:, 0], geom_k[:, 0]), torch.maximum(geom_q[:, 1], geom_k[:, 1])
    bottom = torch.minimum(geom_q[:, 0] + geom_q[:, 2], geom_k[:, 0] + geom_k[:, 2])
    right = torch.minimum(geom_q[:, 1] + geom_q[:, 3], geom_k[:, 1] + geom_k[:, 3])
    valid = (bottom > top) & (right > left)

    def cut(fmap, g):
        flipped = g[:, 4] > 0.5
        fmap = torch.where(flipped[:, None, None, None], fmap.flip(-1), fmap)  # un-flip
        h, w = fmap.shape[-2:]
        index = torch.arange(len(fmap), dtype=fmap.dtype, device=fmap.device)
        # the shared area in this map's cells: source pixel x lies at (x - left) * w / width, less
        # the offset of the cell centres (mirrored in an un-flipped map)
        dx = torch.where(flipped, offset, -offset).to(fmap.dtype)
        boxes = torch.stack([index, (left - g[:, 1]) * w / g[:, 3] + dx,
                             (top - g[:, 0]) * h / g[:, 2] - offset,
                             (right - g[:, 1]) * w / g[:, 3] + dx,
                             (bottom - g[:, 0]) * h / g[:, 2] - offset], 1)
        # one bilinear sample at each output cell's centre: a resize of the fractional box
        return roi_align(fmap, boxes.to(fmap.dtype), size, spatial_scale=1.0, sampling_ratio=1,
                         aligned=True)

    return cut(map_q, geom_q), cut(map_k, geom_k), valid


# Eq. (4)
def equivariant_loss(map_q, map_k, geom_q, geom_k, queue, t, size=16, offset=0.0):
    """At each aligned location s, r_s against t_s (the key view there) and the K queued pooled key
    maps; mean over s, then over the images whose views overlap. Returns (loss, overlap mask)."""
    r, k, valid = align_views(map_q, map_k, geom_q, geom_k, size, offset)
    r = F.normalize(r, dim=1).flatten(2).transpose(1, 2)  # (N, s², C): r_s
    k = F.normalize(k, dim=1).flatten(2).transpose(1, 2)  # t_s
    l_pos = (r * k).sum(-1) / t
    l_neg = (r / t) @ queue  # (N, s², K)
    # cross-entropy with the positive first, without concatenating the (N, s², 1 + K) logits
    ce = torch.logaddexp(l_pos, torch.logsumexp(l_neg, -1)) - l_pos
    weight = valid.to(ce.dtype)
    return (ce.mean(1) * weight).sum() / weight.sum().clamp(min=1), valid


# Human3.6M's 17 joints (the lifted and the real skeletons) and the 16 bones, parent -> child
H36M_JOINTS = ["root", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "belly", "neck",
               "nose", "head", "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow",
               "r_wrist"]
PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15]
BONES = [(PARENTS[j], j) for j in range(1, 17)]


def bone_matrix():
    """C of Eq. (5): column k has +1 at bone k's parent joint and -1 at its child, so B = XC."""
    c = torch.zeros(len(H36M_JOINTS), len(BONES))
    for k, (parent, child) in enumerate(BONES):
        c[parent, k], c[child, k] = 1.0, -1.0
    return c


BONE_MATRIX = bone_matrix()


def kcs(x):
    """Ψ = BᵀB (Eq. 6) of skeletons x (N, 17, 3): Ψ_kl = b_k·b_l, the diagonal the squared bone
    lengths."""
    b = torch.einsum("jk,njc->nkc", BONE_MATRIX.to(x), x)  # Eq. (5): the bone vectors, (N, 16, 3)
    return b @ b.transpose(1, 2)  # Eq. (6)


class ResBlock(nn.Module):
    """x -> LReLU(x + FC(LReLU(FC(x)))): the lifting network's and the discriminator's block."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim))

    def forward(self, x):
        return F.leaky_relu(x + self.fc(x), 0.2)


class Discriminator(nn.Module):
    """Fig. 4b: a pose path (51 -> 256, residual block) and a KCS path (Ψ, 16 x 16 -> 256, residual
    block), concatenated -> 128 -> one score (no sigmoid: LSGAN)."""

    def __init__(self, width=256):
        super().__init__()
        self.pose = nn.Sequential(nn.Linear(3 * len(H36M_JOINTS), width), nn.LeakyReLU(0.2),
                                  ResBlock(width))
        self.kcs = nn.Sequential(nn.Linear(len(BONES) ** 2, width), nn.LeakyReLU(0.2),
                                 ResBlock(width))
        self.final = nn.Sequential(nn.Linear(2 * width, width // 2), nn.LeakyReLU(0.2),
                                   nn.Linear(width // 2, 1))

    def forward(self, x):
        return self.final(
            torch.cat([self.pose(x.flatten(1)), self.kcs(kcs(x).flatten(1))], 1)).squeeze(1)


# Eq. (7)
def encoder_adv_loss(discriminator, lifted):
    """The encoder's side of the LSGAN game, (D(X̂) - 1)²; D's parameters enter detached, so the
    gradient reaches the lifting network and the encoder, never D."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    return ((torch.func.functional_call(discriminator, frozen, (lifted,)) - 1) ** 2).mean()


def discriminator_step(discriminator, optimizer, real, lifted):
    """D's side, real -> 1 and lifted -> 0: (D(y) - 1)² + D(X̂)², one SGD step. Returns (loss,
    accuracy on real, on lifted)."""
    scores = discriminator(torch.cat([real, lifted.detach()]))
    s_real, s_lifted = scores[:len(real)], scores[len(real):]
    loss = ((s_real - 1) ** 2).mean() + (s_lifted ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (s_real > 0.5).float().mean(), (s_lifted < 0.5).float().mean()


# App. B: the real skeletons, drawn from a kinematic prior. Template bones in cm (b_pc) in the rest
# pose, x = the subject's right, y = down, z = facing: Human3.6M's mean proportions scaled to the
# paper's (0, 45, 0) thigh; arms hang down
TEMPLATE = torch.tensor([
    [13.5, 0, 0], [0, 45.0, 0], [0, 46.1, 0],         # root -> r_hip -> r_knee -> r_ankle
    [-13.5, 0, 0], [0, 45.0, 0], [0, 46.1, 0],        # root -> l_hip -> l_knee -> l_ankle
    [0, -23.7, 0], [0, -26.1, 0],                     # root -> belly -> neck
    [0, -12.3, 0], [0, -11.7, 0],                     # neck -> nose -> head
    [-15.3, 0, 0], [0, 28.3, 0], [0, 25.6, 0],        # neck -> l_shoulder -> l_elbow -> l_wrist
    [15.3, 0, 0], [0, 28.3, 0], [0, 25.6, 0],         # neck -> r_shoulder -> r_elbow -> r_wrist
], dtype=torch.float64)
# Joint angle ranges (degrees) (a, b, c) of each bone relative to its parent bone, R = Rz(c) Ry(b)
# Rx(a): for a bone hanging down, a > 0 swings its end forward, b twists it, c < 0 tilts it to the
# right. Bones listed together share one draw (rigid parts).
PRIOR_RANGES = [
    ((0, 3), (-15, 15), (-45, 45), (-10, 10)),        # pelvis (root -> hips)
    ((1,), (-30, 90), (-45, 45), (-45, 15)),          # right thigh: flexion, twist, abduction out
    ((4,), (-30, 90), (-45, 45), (-15, 45)),          # left thigh
    ((2,), (-130, 0), (0, 0), (0, 0)),                # right knee: the shin swings backwards only
    ((5,), (-130, 0), (0, 0), (0, 0)),                # left knee
    ((6,), (-30, 10), (-20, 20), (-15, 15)),          # lower spine (a < 0 bends forward)
    ((7,), (-30, 10), (-20, 20), (-15, 15)),          # upper spine
    ((8,), (-45, 45), (-60, 60), (-30, 30)),          # neck -> nose
    ((9,), (0, 0), (0, 0), (0, 0)),                   # nose -> head: the head is rigid
    ((10, 13), (-10, 10), (-15, 15), (-10, 10)),      # shoulder line (neck -> shoulders)
    ((11,), (-60, 150), (-90, 90), (-20, 120)),       # left upper arm: flexion, twist, abduction
    ((14,), (-60, 150), (-90, 90), (-120, 20)),       # right upper arm
    ((12,), (0, 150), (0, 0), (0, 0)),                # left elbow: the forearm swings forwards only
    ((15,), (0, 150), (0, 0), (0, 0)),                # right elbow
]
# the bone each bone hangs from (-1: from the root)
PARENT_BONE = [next((i for i, (_, c) in enumerate(BONES) if c == p), -1) for p, _ in BONES]


def euler_xyz(a, b, c):
    """Rotation matrices (..., 3, 3) Rz(c) Ry(b) Rx(a) of angles in radians (scipy's
    from_euler("xyz"))."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)

    def rot(t, i, j):  # rotation by t in the (i, j) plane
        m = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        m[i][i], m[i][j], m[j][i], m[j][j] = t.cos(), -t.sin(), t.sin(), t.cos()
        return torch.stack([torch.stack(row, -1) for row in m], -2)

    return rot(c, 0, 1) @ rot(b, 2, 0) @ rot(a, 1, 2)


def sample_bodies(n, generator=None, ranges=PRIOR_RANGES, template=TEMPLATE):
    """n skeletons (n, 17, 3) in cm, float64: j_child = j_parent + G_pc α b_pc, α ~ U[0.9, 1.1] per
    bone, G_pc = G_parent R_pc, R_pc drawn from `ranges` (joint angles)."""
    def uniform(lo, hi):
        return (math.radians(lo) + math.radians(hi - lo)
                * torch.rand(n, generator=generator, dtype=torch.float64))

    local = torch.eye(3, dtype=torch.float64).repeat(len(BONES), n, 1, 1)
    for bones, a, b, c in ranges:
        local[list(bones)] = euler_xyz(uniform(*a), uniform(*b), uniform(*c))
    alpha = 0.9 + 0.2 * torch.rand(len(BONES), n, 1, generator=generator, dtype=torch.float64)
    glob, joints = [], [torch.zeros(n, 3, dtype=torch.float64)] * len(H36M_JOINTS)
    # parents come before their children in the H36M order
    for k, (parent, child) in enumerate(BONES):
        glob.append(local[k] if PARENT_BONE[k] < 0 else glob[PARENT_BONE[k]] @ local[k])
        joints[child] = joints[parent] + alpha[k] * (glob[k] @ template[k].to(torch.float64))
    return torch.stack(joints, 1)


def sample_prior(n=10000, seed=0):
    """App. B's real skeletons (float32): bodies divided by their Frobenius norm, then turned about
    the vertical axis ("around Z" in the paper; here y) by a uniform angle."""
    g = torch.Generator().manual_seed(seed)
    x = sample_bodies(n, g)
    x = x / x.flatten(1).norm(dim=1).view(-1, 1, 1)
    yaw = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * math.pi
    zero = torch.zeros_like(yaw)
    return (x @ euler_xyz(zero, yaw, zero).transpose(1, 2)).float()


def normalize_skeletons(x):
    """Root-centred (joint 0 at the origin) and divided by the Frobenius norm, as the prior's."""
    x = x - x[:, :1]
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)


def bone_lengths(x):
    return (x[:, [c for _, c in BONES]] - x[:, [p for p, _ in BONES]]).norm(dim=-1)


@torch.no_grad()
def bone_error(x, reference):
    """Mean |ln(l_b / reference l_b)| over the bones of skeletons x, root-centred and normalised:
    0 when their proportions are the reference's, whatever their size."""
    length = bone_lengths(normalize_skeletons(x.float())).clamp_min(1e-8)
    return (length / reference).log().abs().mean()

# End of the liftable block.


# ----------------------------------------------------------------------------------------------
# Training

# the per-iteration values an epoch averages, in log.jsonl's order
EPOCH_MEANS = ["loss", "l_inv", "l_equiv", "l_adv", "d_loss", "d_acc_real", "d_acc_lifted",
               "overlap", "z_std", "bone_error"]


def adjust_learning_rate(optimizer, init_lr, epoch, epochs):
    """Cosine decay once per epoch, no warm-up (MoCo v2's --cos); D's lr stays constant."""
    lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(batch, model, discriminator, ddp_disc, optimizer, d_optimizer, scaler, args, device,
               real, reference, appearance=None):
    """An encoder step on Eq. (1) through `model` (its DDP wrapper), D fixed in L_adv; then a step
    of D (`ddp_disc`) on the same lifted skeletons. Returns (loss, its EPOCH_MEANS, lifted)."""
    im_q, im_k, geom_q, geom_k = batch
    im_q, im_k = im_q.to(device, non_blocking=True), im_k.to(device, non_blocking=True)
    if appearance is not None:
        im_q, im_k = appearance(im_q).to(device), appearance(im_k).to(device)
    geom_q, geom_k = geom_q.to(device, non_blocking=True), geom_k.to(device, non_blocking=True)
    with autocast(args, device):
        out = model(im_q, im_k, geom_q, geom_k)
    loss, l_adv = encoder_loss(out, discriminator, args)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    d_loss, acc_real, acc_lifted = discriminator_step(
        ddp_disc, d_optimizer, real[torch.randint(len(real), (len(im_q),), device=device)],
        out["lifted"])
    zero = loss.new_zeros(())
    values = torch.stack([loss.detach(), out["l_inv"].detach(),
                          zero if out["l_equiv"] is None else out["l_equiv"].detach(),
                          l_adv.detach(), d_loss, acc_real, acc_lifted,
                          zero if out["valid"] is None else out["valid"].float().mean(),
                          out["q"].std(0).mean(), bone_error(out["lifted"], reference)])
    return loss.detach(), values, out["lifted"]


def train(loader, model, discriminator, ddp_disc, optimizer, d_optimizer, scaler, epoch, it,
          total_iters, args, device, *, real, reference, appearance=None):
    """One epoch, or up to iteration `total_iters`. Returns (the epoch's log.jsonl entry, the
    iteration reached, four lifted skeletons of the last batch on the CPU)."""
    lr, world = optimizer.param_groups[0]["lr"], dist.world_size()
    ckpt_path = os.path.join(args.out, "checkpoint.pth")  # the finite check names it
    model.train()
    progress = Progress(min(len(loader), total_iters - it), args.print_freq, dist.is_main(),
                        f"epoch {epoch + 1} ")
    sums, n_iter, n_pairs, t0 = torch.zeros(len(EPOCH_MEANS), device=device), 0, 0, time.time()
    for i, batch in enumerate(loader):
        if it >= total_iters:
            break
        loss, values, lifted = train_step(batch, model, discriminator, ddp_disc, optimizer,
                                          d_optimizer, scaler, args, device, real, reference,
                                          appearance)
        it += 1
        n_iter += 1
        n_pairs += len(lifted) * world
        sums += values
        if (i + 1) % args.print_freq == 0:
            mean_loss = dist.all_reduce_mean(loss)  # the same on every rank: all stop together
            check_finite(mean_loss, it, ckpt_path)
            progress.step(i, args.print_freq * len(lifted) * world, loss=mean_loss.item(), lr=lr)
    means = dist.all_reduce_mean(sums / max(1, n_iter))
    check_finite(means, it, ckpt_path)
    log = dict(epoch=epoch + 1, iteration=it, **dict(zip(EPOCH_MEANS, means.tolist())),
               z_std_healthy=1 / math.sqrt(args.dim), lr=lr,
               pairs_per_s=n_pairs / (time.time() - t0))
    return log, it, lifted[:4].detach().cpu()


RESUME_KEYS = ("data", "backbone", "dim", "moco_k", "moco_m", "moco_t", "lambda_inv",
               "lambda_equiv", "lambda_adv", "align_size", "cell_centres", "normalize_lifted",
               "bn_groups", "skeletons", "prior_size", "crop_size", "person_size", "epochs", "lr",
               "d_lr", "momentum", "wd", "batch_size", "amp", "seed", "data_seed", "images")


def save(args, model, discriminator, optimizer, d_optimizer, scaler, rngs, history, lifted, real):
    """Rank 0's outputs after an epoch (history[-1]): checkpoint.pth (all --resume needs, `rngs`
    every rank's RNGs), backbone.pth, log.jsonl, loss.png, lifted.png and the epoch line."""
    log = history[-1]
    save_checkpoint(os.path.join(args.out, "checkpoint.pth"),
                    {"model": model.state_dict(), "discriminator": discriminator.state_dict(),
                     "optimizer": optimizer.state_dict(), "d_optimizer": d_optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": log["epoch"],
                     "iteration": log["iteration"], "args": vars(args), "rng": rngs})
    # the query ResNet in torchvision key names, for mrpose.py --pretrained
    save_checkpoint(os.path.join(args.out, "backbone.pth"), model.encoder_q.backbone.state_dict())
    write_log(os.path.join(args.out, "log.jsonl"), history)
    plot_curves(os.path.join(args.out, "loss.png"), [e["epoch"] for e in history],
                {name: [e[key] for e in history] for name, key in
                 (("total (Eq. 1)", "loss"), ("L_inv", "l_inv"), ("L_equiv", "l_equiv"),
                  ("L_adv", "l_adv"), ("D loss", "d_loss"))}, xlabel="epoch")
    plot_skeletons_3d(os.path.join(args.out, "lifted.png"),
                      {"lifted": normalize_skeletons(lifted).numpy(),
                       "prior": real[:4].cpu().numpy()}, BONES)
    print(f"epoch {log['epoch']}/{args.epochs}: "
          + ", ".join(f"{k} {log[k]:.4f}" for k in EPOCH_MEANS)
          + f" (z std healthy ~{log['z_std_healthy']:.4f}); lr {log['lr']:.4g}, "
          f"{log['pairs_per_s']:.1f} pairs/s", flush=True)


def main():
    args = get_args()
    if begin(args, run_plan, print_summary):  # --dry-run, --summary: nothing to train
        return
    rank, world, device = dist.setup(args.device)
    aug_device = resolve_aug_device(args.aug_device, device)
    main_proc = dist.is_main()
    args.bn_groups = args.bn_groups or max(1, 4 // world)
    per_rank = args.batch_size // world
    if (per_rank < 2 * args.bn_groups or per_rank * world != args.batch_size
        or per_rank % args.bn_groups):
        raise UserError(f"--batch-size {args.batch_size} does not split into {world} ranks x "
                        f"{args.bn_groups} BatchNorm groups of at least 2 images")
    loader, sampler, appearance = make_loader(args, per_rank, device, aug_device)

    seed_everything(args.seed)  # the same model, queues and prior on every rank
    model = build_model(args)
    report = load_pretrained(model, args.pretrained, args.backbone)
    discriminator = Discriminator()
    real = load_skeletons(args.skeletons) if args.skeletons else sample_prior(args.prior_size)
    reference = bone_lengths(normalize_skeletons(real)).mean(0)
    seed_everything(args.seed + rank)
    model.to(device)
    discriminator.to(device)
    real, reference = real.to(device), reference.to(device)

    total_iters = min(args.iters or math.inf, args.epochs * len(loader))
    ddp_model = dist.ddp(model, device)
    # the ResNets: compiled, MoCo's queue updates stay eager
    for encoder in (model.encoder_q, model.encoder_k):
        compile_model(encoder, args.compile)
    ddp_disc = dist.ddp(discriminator, device)
    init_lr = args.lr * args.batch_size / 128  # App. C: 0.03 at batch 128
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], init_lr,
                                momentum=args.momentum, weight_decay=args.wd)
    d_optimizer = torch.optim.SGD(discriminator.parameters(), args.d_lr, momentum=args.momentum,
                                  weight_decay=args.wd)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, history = resume_pretraining(
        args, RESUME_KEYS, total_iters, ("normalize_lifted",), model=model,
        discriminator=discriminator, optimizer=optimizer, d_optimizer=d_optimizer, scaler=scaler)
    if main_proc:  # the settings are in OUT/args.json, the model's size in --summary
        os.makedirs(args.out, exist_ok=True)
        print(f"{report}\nLiftedCL {args.backbone}: {len(loader.dataset)} images, {args.crop_size} "
              f"px views; {len(loader)} it/epoch x {args.epochs} epochs on {world} x {device}, "
              f"{args.bn_groups} BN group(s) per rank; lr {args.lr} x {args.batch_size}/128 = "
              f"{init_lr:.5g}, D lr {args.d_lr}; {len(real)} real skeletons "
              f"({args.skeletons or 'App. B prior'})", flush=True)

    for epoch in range(start_epoch, args.epochs):
        if it >= total_iters:
            break
        sampler.set_epoch(epoch)
        adjust_learning_rate(optimizer, init_lr, epoch, args.epochs)
        log, it, lifted = train(loader, ddp_model, discriminator, ddp_disc, optimizer, d_optimizer,
                                scaler, epoch, it, total_iters, args, device, real=real,
                                reference=reference, appearance=appearance)
        history.append(log)
        rngs = dist.gather_objects(rng_state())  # every rank calls it; rank 0 saves them
        if main_proc:
            save(args, model, discriminator, optimizer, d_optimizer, scaler, rngs, history, lifted,
                 real)
    finish_pretraining(args.out, model, discriminator)


if __name__ == "__main__":
    run_main(main)
