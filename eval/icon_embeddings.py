"""ICON's Fig. 5 on a saved icon.py checkpoint: how well the encoder's features at the visible
ground-truth joints of validation persons separate by keypoint class, as a number and a PCA plot.

    python -m eval.icon_embeddings --checkpoint runs/icon-demo-resnet18/best.pth

The features are sampled from the map the projection head reads (ResNet's C4, HRNet's stage 3),
before the head, so a baseline run (--lambda-p 0, no head) and an ICON run are measured alike.
The data, model and visibility rule are the checkpoint's own icon.py arguments.
"""
import argparse
import os
from argparse import Namespace

import torch
import torch.nn.functional as F

import icon
from common.plots import plot_embeddings
from common.topdown import build_data, load_weights, to_memory_format
from common.transforms import normalize
from common.utils import UserError, autocast, load_checkpoint, run_main, save_json
from data.demo import demo_root


@torch.no_grad()
def embedding_separation(pose, dataset, args, device, max_persons=256):
    """Tapped features at the visible GT joints of the first `max_persons` persons, sampled
    bilinearly. Returns (mean cosine of same-class pairs across persons, of other-class pairs
    across persons, unit features (n, D), classes (n,))."""
    pose.eval()
    subset = torch.utils.data.Subset(dataset, range(min(max_persons, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=max(1, args.batch_size),
                                         num_workers=args.workers)
    feats, classes, instances = [], [], []
    for batch in loader:
        x = to_memory_format(normalize(batch["image"].to(device)), args)
        with autocast(args, device):
            _, tap = icon.Tapped(pose)(x)
        tap = tap.float()
        size = tap.new_tensor([tap.shape[-1], tap.shape[-2]])
        stride = tap.new_tensor(args.input_size) / size
        joints = batch["joints"].to(device)
        grid = (joints / stride + 0.5) / size * 2 - 1  # feature pixel i sits at input stride x i
        f = F.grid_sample(tap, grid[:, :, None], align_corners=False)[..., 0].transpose(1, 2)
        inside = ((joints >= 0) & (joints < joints.new_tensor(args.input_size))).all(-1)
        keep = (batch["vis_flag"].to(device) >= icon.visible_flags(args).to(device)) & inside
        feats.append(f[keep])
        classes.append(keep.nonzero()[:, 1])
        instances.append(batch["index"].to(device)[:, None].expand_as(keep)[keep])
    if not sum(len(f) for f in feats):
        return float("nan"), float("nan"), None, None
    x = F.normalize(torch.cat(feats), dim=1)
    k, n = torch.cat(classes), torch.cat(instances)
    sim = x @ x.T
    across = n[:, None] != n[None, :]
    same = (k[:, None] == k[None, :]) & across
    other = (k[:, None] != k[None, :]) & across
    return sim[same].mean().item(), sim[other].mean().item(), x.cpu(), k.cpu()


def plot_embedding_pca(path, x, k, names, same, other, title):
    """The first two principal components of the unit features, coloured by keypoint class."""
    xc = x - x.mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    plot_embeddings(path, (xc @ v[:2].T).numpy(), k.numpy(), names,
                    f"{title}: cosine same class {same:.3f}, other classes {other:.3f} (across "
                    f"instances)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="icon.py's best.pth or checkpoint.pth")
    p.add_argument("--max-persons", type=int, default=256, help="validation persons measured")
    p.add_argument("--out", default=None,
                   help="folder of embeddings.png and embeddings.json (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = p.parse_args(argv)
    ckpt = load_checkpoint(opts.checkpoint)
    if not isinstance(ckpt.get("args"), dict) or "embed_dim" not in ckpt["args"]:
        raise UserError(f"{opts.checkpoint}: not an icon.py checkpoint (no icon.py arguments)")
    args = Namespace(**dict(ckpt["args"], pretrained="none", det_json=None))
    if args.data == "demo":
        args.data_root = demo_root(getattr(args, "data_seed", args.seed))
    device = torch.device(opts.device)
    pose = icon.build_model(args)[0]
    load_weights(pose, opts.checkpoint, ckpt, flags=icon.MODEL_FLAGS)
    _, val_ds, _ = build_data(args, train=False)  # GT boxes: the persons' own joints
    same, other, x, k = embedding_separation(pose.to(device), val_ds, args, device,
                                             opts.max_persons)
    out = opts.out or os.path.dirname(os.path.abspath(opts.checkpoint))
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "embeddings.json"),
              dict(embed_same=same, embed_other=other, embed_sep=same - other))
    if x is not None:
        plot_embedding_pca(os.path.join(out, "embeddings.png"), x, k, icon.JOINT_NAMES[args.data],
                           same, other, f"{args.backbone} tapped features")
    print(f"embeddings (tapped features, val): same-class cosine {same:.4f}, other-class "
          f"{other:.4f}, separation {same - other:.4f}", flush=True)


if __name__ == "__main__":
    run_main(main)
