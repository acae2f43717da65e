"""The loss over a crop's labeled voxels (the learned depth's pooled columns: ink3d.columns.column_loss)."""

import torch
import torch.nn.functional as F

from ink3d.dataset import BACKGROUND


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 0.0, background_weight: float = 0.0,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE with logits averaged over labeled voxels (labels >= 0), plus an optional soft Dice term over
    them, plus `background_weight` x the BCE (target 0) averaged over BACKGROUND voxels. Each mean
    is over its own voxels, so the many air voxels of a crop do not drown the few labeled ones.

    Returns (loss, number of labeled voxels), both tensors on the logits' device: the voxels are masked, not
    selected, so nothing waits for the host. With nothing to learn from the loss is an exact 0 that still
    depends on `logits` (so every DistributedDataParallel rank runs backward).
    """
    logits = logits.float()
    labeled = labels >= 0
    count = labeled.sum()
    weight = labeled.float()
    targets = torch.where(labeled, labels, torch.zeros_like(labels)).float()
    smoothed = targets * (1 - label_smoothing) + label_smoothing / 2
    bce = F.binary_cross_entropy_with_logits(logits, smoothed, reduction="none")
    loss = (bce * weight).sum() / count.clamp(min=1)
    if dice_weight:
        probabilities = torch.sigmoid(logits) * weight
        loss = loss + dice_weight * (1 - (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1))
    if background_weight:
        background = (labels == BACKGROUND).float()
        air = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label_smoothing / 2), reduction="none")
        loss = loss + background_weight * (air * background).sum() / background.sum().clamp(min=1)
    return loss, count
