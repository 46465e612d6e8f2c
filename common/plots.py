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


def plot_embeddings(path, points, labels, names, title=""):
    """2-D points (e.g. a PCA of keypoint embeddings) coloured by class, one legend entry per class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        sel = labels == k
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.6, color=cmap(k % 20), label=name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)
