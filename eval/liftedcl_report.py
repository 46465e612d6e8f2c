"""LiftedCL's lifted skeletons judged on a saved checkpoint: how plausible the skeletons lifted from
training images are beside the real ones (the App. B prior or --skeletons), and how often either
bends a leg oddly. An analysis, not training: liftedcl.py logs only the lifted bone error.

    python -m eval.liftedcl_report runs/liftedcl-demo-resnet18/checkpoint.pth -n 256
"""
import argparse
import json

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import liftedcl
from common.ssl import IMAGENET_NORMALIZE
from common.utils import UserError, load_checkpoint, misfit, run_main

# (left, right) indices in liftedcl.BONES: hip..forearm
LR_BONES = [(3, 0), (4, 1), (5, 2), (10, 13), (11, 14), (12, 15)]
PLAUSIBILITY = ["bone_error", "lr_ratio", "spread"]


@torch.no_grad()
def plausibility(x, reference):
    """Scale-free plausibility of skeletons x (N, 17, 3): liftedcl.bone_error against the reference
    bone lengths (0: its proportions); lr_ratio, mean longer / shorter of the 6 left/right bone
    pairs (1: symmetric); spread, mean over bones of a length's std / mean across x (0: alike)."""
    length = liftedcl.bone_lengths(liftedcl.normalize_skeletons(x.float())).clamp_min(1e-8)
    error = liftedcl.bone_error(x, reference)
    left, right = length[:, [l for l, _ in LR_BONES]], length[:, [r for _, r in LR_BONES]]
    ratio = (torch.maximum(left, right) / torch.minimum(left, right)).mean()
    spread = (length.std(0) / length.mean(0)).mean() if len(x) > 1 else torch.zeros_like(error)
    return torch.stack([error, ratio, spread])


@torch.no_grad()
def anatomy(x):
    """Shares of anatomically odd legs in skeletons x (N, 17, 3), y down: knees bent over 90°; knees
    bent over 10° whose ankle swings in front of the thigh's line (side taken from the hips: x = the
    subject's right); thighs above horizontal. Any yaw about the vertical leaves them unchanged."""
    x = x.double()
    right = F.normalize(x[:, 1] - x[:, 4], dim=1)
    over_90, forward, above = [], [], []
    for hip, knee, ankle in ((1, 2, 3), (4, 5, 6)):
        thigh, shin = x[:, knee] - x[:, hip], x[:, ankle] - x[:, knee]
        bend = torch.rad2deg(torch.arccos(F.cosine_similarity(thigh, shin, dim=1).clamp(-1, 1)))
        over_90.append(bend > 90)
        forward.append(((torch.linalg.cross(thigh, shin, dim=1) * right).sum(1) > 0)[bend > 10])
        above.append(thigh[:, 1] < 0)
    return {name: torch.cat(v).double().mean().item() for name, v in
            (("knee_over_90", over_90), ("knee_forward", forward),
             ("thigh_above_horizontal", above))}


@torch.no_grad()
def lift(checkpoint, n=256, images=None):
    """The checkpoint's model (eval mode), the skeletons it lifts from the first n training images
    (or those of the folder `images`), each resized whole to one view, and the run's real
    skeletons: (model, lifted, real)."""
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or not {"model", "args"} <= set(ckpt):
        raise UserError(f"{checkpoint}: not a liftedcl.py checkpoint.pth (no 'model' and 'args')")
    args = argparse.Namespace(**ckpt["args"])
    args.images = images or args.images
    args.person_size = tuple(args.person_size) if args.person_size else None
    model = liftedcl.build_model(args)
    wrong = misfit(model.state_dict(), ckpt["model"])
    if wrong:
        raise UserError(f"{checkpoint}: does not fit liftedcl.py's model ({wrong})")
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = liftedcl.TwoViews(liftedcl.training_items(args)[:n], args.crop_size, args.person_size)
    views = torch.stack([IMAGENET_NORMALIZE(TF.to_tensor(TF.resize(data.source(i),
                                                                   [args.crop_size] * 2)))
                         for i in range(len(data))])
    pooled = torch.cat([model.encoder_q(chunk)[0] for chunk in views.split(64)])
    real = (liftedcl.load_skeletons(args.skeletons) if args.skeletons
            else liftedcl.sample_prior(args.prior_size))
    return model, model.lifting(pooled), real


def report(checkpoint, n=256, images=None):
    """Plausibility and anatomy of the lifted and of the real skeletons, as a dict."""
    _, lifted, real = lift(checkpoint, n, images)
    reference = liftedcl.bone_lengths(liftedcl.normalize_skeletons(real)).mean(0)
    return {name: dict(zip(PLAUSIBILITY, plausibility(x, reference).tolist()), **anatomy(x),
                       skeletons=len(x))
            for name, x in (("lifted", lifted), ("real", real))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint.pth of liftedcl.py")
    p.add_argument("-n", type=int, default=256, help="images to lift")
    p.add_argument("--images", default=None, help="a folder of images instead of the run's data")
    a = p.parse_args(argv)
    print(json.dumps(report(a.checkpoint, a.n, a.images), indent=1))


if __name__ == "__main__":
    run_main(main)
