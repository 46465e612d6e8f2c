"""Heatmap targets and decoding with the SimpleBaseline/HRNet conventions, batched in torch.

Coordinates are in pixels of the network input (targets) or of the heatmap (decoding); a heatmap
pixel covers `stride` input pixels and joint x lands on heatmap column round(x / stride).
"""
import torch


def gaussian_targets(joints, visible, input_size, heatmap_size, sigma=2.0):
    """Gaussian heatmaps for a whole batch at once, equal to HRNet's per-joint loop.

    joints (B, K, 2) in input pixels, visible (B, K) > 0 where labeled; sizes are (w, h).
    Returns target (B, K, h, w) and target_weight (B, K). As in HRNet, the Gaussian (radius 3σ) is
    centred on the integer pixel nearest the joint, and the weight is 0 for unlabeled joints and for
    joints whose Gaussian window lies entirely off the map."""
    (iw, ih), (w, h) = input_size, heatmap_size
    radius = int(sigma * 3)
    stride = joints.new_tensor([iw / w, ih / h])
    # int(x + 0.5) truncates toward zero in HRNet; trunc keeps that for joints left of the map too
    mu = torch.trunc(joints / stride + 0.5)
    inside = (mu[..., 0] - radius < w) & (mu[..., 1] - radius < h) & \
             (mu[..., 0] + radius + 1 >= 0) & (mu[..., 1] + radius + 1 >= 0)
    weight = ((visible > 0) & inside).to(joints.dtype)
    # exp(-(dx²+dy²)/2σ²) = exp(-dx²/2σ²)·exp(-dy²/2σ²): build each axis once, one outer product
    dx = torch.arange(w, device=joints.device, dtype=joints.dtype) - mu[..., 0:1]
    dy = torch.arange(h, device=joints.device, dtype=joints.dtype) - mu[..., 1:2]
    gx = torch.exp(-dx ** 2 / (2 * sigma ** 2)) * (dx.abs() <= radius)
    gy = torch.exp(-dy ** 2 / (2 * sigma ** 2)) * (dy.abs() <= radius)
    target = gy.unsqueeze(-1) * gx.unsqueeze(-2) * weight[..., None, None]
    return target, weight


def joints_mse_loss(output, target, weight):
    """Eq. (1): per-joint MSE averaged over pixels and joints, joints weighted by target_weight.

    As SimpleBaseline's JointsMSELoss: 0.5·mean((w·(H - Ĥ))²) over the batch."""
    w = weight[..., None, None]
    return 0.5 * ((output * w - target * w) ** 2).mean()


def flip_back(heatmaps, flip_pairs):
    """Mirror heatmaps predicted on a flipped input and swap left/right joint channels."""
    heatmaps = heatmaps.flip(-1)
    perm = list(range(heatmaps.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return heatmaps[:, perm]


def decode_heatmaps(heatmaps):
    """Argmax plus the quarter-pixel shift toward the higher neighbour (MRPose Sec. IV-A).

    Returns coords (B, K, 2) in heatmap pixels and maxvals (B, K). Joints whose maximum is not
    positive get coordinate 0, as in HRNet's get_max_preds."""
    b, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, k, -1)
    maxvals, idx = flat.max(dim=-1)
    x, y = idx % w, torch.div(idx, w, rounding_mode="floor")
    coords = torch.stack([x, y], dim=-1).to(heatmaps.dtype)
    # the shift needs both neighbours; HRNet's condition 1 < px < w-1 also leaves column/row 1 alone
    hm = heatmaps.reshape(b * k, h, w)
    xi, yi = x.reshape(-1).clamp(1, w - 2), y.reshape(-1).clamp(1, h - 2)
    n = torch.arange(b * k, device=heatmaps.device)
    diff = torch.stack([hm[n, yi, xi + 1] - hm[n, yi, xi - 1],
                        hm[n, yi + 1, xi] - hm[n, yi - 1, xi]], -1)
    interior = ((x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)).reshape(-1, 1)
    coords = coords + (0.25 * torch.sign(diff) * interior).reshape(b, k, 2)
    coords = coords * (maxvals > 0).unsqueeze(-1)
    return coords, maxvals
