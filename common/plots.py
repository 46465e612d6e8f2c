"""Matplotlib figures written next to a run's logs (Agg backend: no display needed)."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.utils import atomic_write  # noqa: E402


def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_predictions(path, images, joints, confidences, skeleton, conf_thresh=0.2, cols=4):
    """A grid of input crops (uint8 CHW tensors) with predicted skeletons in crop pixels."""
    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, pts, conf in zip(axes.flat, images, joints, confidences):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ok = conf > conf_thresh
        for a, b in skeleton:
            if ok[a] and ok[b]:
                ax.plot([pts[a, 0], pts[b, 0]], [pts[a, 1], pts[b, 1]], "-", lw=2, color="lime")
        ax.scatter(pts[ok, 0], pts[ok, 1], s=10, c="red", zorder=3)
    fig.tight_layout()
    _save(fig, path)


def plot_curves(path, steps, curves, xlabel="iteration", ylabel="loss"):
    """Line plot of named curves over a common x axis (e.g. per-scale losses)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(steps[:len(ys)], ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_skeletons_3d(path, rows, bones, cols=4):
    """3D stick figures, one row per named set of skeletons ((n, J, 3) arrays, y pointing down)."""
    fig = plt.figure(figsize=(2.6 * cols, 2.8 * len(rows)))
    for r, (name, skeletons) in enumerate(rows.items()):
        for c, joints in enumerate(skeletons[:cols]):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1, projection="3d")
            x, y, z = joints[:, 0], joints[:, 2], -joints[:, 1]  # depth into the page, up is up
            for a, b in bones:
                ax.plot([x[a], x[b]], [y[a], y[b]], [z[a], z[b]], "-", lw=2, color="tab:blue")
            ax.scatter(x, y, z, s=6, c="red")
            half = max(1e-6, float(abs(joints).max()))
            ax.set(xlim=(-half, half), ylim=(-half, half), zlim=(-half, half), xticks=[], yticks=[],
                   zticks=[])
            ax.set_title(f"{name} {c + 1}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_embeddings(path, points, labels, names, title=""):
    """2-D points (e.g. a PCA of keypoint embeddings) coloured by class, one legend entry per
    class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        sel = labels == k
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.6, color=cmap(k % 20),
                       label=name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)
