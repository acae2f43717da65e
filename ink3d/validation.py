"""Validation during training: the metrics over the validation blocks, their 3D score against a synthetic
scroll's true ink, and the picture of a few of them."""

import cv2
import numpy as np
import torch

from ink3d import InputError, volume
from ink3d.columns import column_loss, face_bags, sample_columns
from ink3d.device import autocast
from ink3d.loss import masked_loss
from ink3d.metrics import VoxelCounts, best_fbeta, roc_auc
from ink3d.sliding_window import to_uint8

UNLABELED_GREY = 128  # labels in the validation picture: ink 255, no ink 0, unlabeled this grey
PICTURE_COLUMN = 160  # minimum width of a column of the validation picture, pixels (patches are enlarged to it)


def _text_band(width: int, texts: list[tuple[int, str]], height: int = 18) -> np.ndarray:
    """A black band with white texts at the given x positions."""
    band = np.zeros((height, width), np.uint8)
    for x, text in texts:
        cv2.putText(band, text, (x + 3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    return band


def validation_picture(images, labels, probabilities, title: str) -> np.ndarray:
    """Under `title` and column captions, a row per validation block of its middle z-slice: the model's input,
    the label (ink white, no ink black, unlabeled grey) and the predicted probability (black 0, white 1)."""
    rows = []
    for image, label, probability in zip(images, labels, probabilities):
        middle = image.shape[-3] // 2
        label_slice = label[0, middle]
        columns = [image[0, middle] * 255, np.where(label_slice >= 0, np.clip(label_slice, 0, 1) * 255, UNLABELED_GREY),
                   probability[0, middle] * 255]
        scale = max(1, -(-PICTURE_COLUMN // label_slice.shape[1]))
        columns = [cv2.resize(np.clip(np.rint(c), 0, 255).astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                   for c in columns]
        rows.append(np.concatenate([np.pad(c, ((0, 2), (0, 2))) for c in columns], axis=1))
    body = np.concatenate(rows, axis=0)
    column = body.shape[1] // 3
    captions = [(0, "model input"), (column, "label (grey: none)"), (2 * column, "prediction")]
    return np.concatenate([_text_band(body.shape[1], [(0, title)]), _text_band(body.shape[1], captions), body], axis=0)


class ValidationTruth:
    """The true ink and the scan of the validation blocks (a synthetic scroll's ground truth), for the 3D score."""

    def __init__(self, truth_path, volume_path, origins: np.ndarray, patch: int, air_level: int, level: int = 0):
        self.truth_file, self.truth = volume.open_dataset(truth_path, volume.GROUND_TRUTH, level=level)
        self.scan_file, self.scan = volume.open_dataset(volume_path, volume.SCAN, level=level)
        if self.truth.shape != self.scan.shape:
            raise InputError(f"{truth_path}: shape {self.truth.shape} differs from the scan's {self.scan.shape}")
        self.origins, self.patch, self.air_level = origins, patch, air_level

    def add(self, counts: VoxelCounts, index: int, probabilities: np.ndarray) -> None:
        """Count validation block `index` (in the order of the validation loader) with its predicted probabilities."""
        origin, shape = self.origins[index % len(self.origins)], (self.patch,) * 3
        ink = volume.read_crop(self.truth, origin, shape) > 0
        counts.add(to_uint8(probabilities), ink, volume.read_crop(self.scan, origin, shape), self.air_level)

    def close(self):
        self.truth_file.close()
        self.scan_file.close()


@torch.no_grad()
def validate(model, loader, device, dtype, channels_last, dice_weight, truth: ValidationTruth | None = None,
             band: float = 0.0, sharpness: float = 1.0) -> tuple[dict, tuple]:
    """Loss, best-threshold F0.5, ROC AUC over labeled voxels (with columns, `band` > 0: over the labeled pixels'
    columns, each scored by its maximum probability); the intensity-threshold baseline (columns: their mean
    intensity); with `truth`, the 3D score of every voxel of the validation blocks. Also the images, labels and
    probabilities of the first 4 blocks, for the validation picture."""
    model.eval()
    scores, truths, intensities, losses, weights, picture_parts = [], [], [], [], [], ([], [], [])
    counts, index = VoxelCounts(), 0
    for images, labels, _, *columns in loader:
        batch = images.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, dtype):
            logits = model(batch)
        logits = logits.float().cpu()
        loss, count = masked_loss(logits, labels, 0.0 if columns else dice_weight)
        count = int(count)
        if columns:
            column_logits, counted = sample_columns(logits, columns[0], band)
            targets = columns[0][..., 6][counted]
            loss = loss + column_loss(column_logits, columns[0][..., 6], sharpness, dice_weight, face_bags(columns[0], band), counted)
            count += int(counted.sum())
            scores.append(torch.sigmoid(column_logits[counted].max(dim=-1).values).numpy())
            truths.append(targets.numpy() > 0.5)
            intensities.append(sample_columns(images, columns[0], band)[0][counted].mean(dim=-1).numpy())
        if count:
            losses.append(loss.item() * count)
            weights.append(count)
        if truth is not None:
            for probabilities in torch.sigmoid(logits)[:, 0].numpy():
                truth.add(counts, index, probabilities)
                index += 1
        if not columns:
            labeled = labels >= 0
            scores.append(torch.sigmoid(logits[labeled]).numpy())
            truths.append(labels[labeled].numpy() > 0.5)
            intensities.append(images[labeled].numpy())
        if len(picture_parts[0]) < 4:
            for part, values in zip(picture_parts, (images, labels, torch.sigmoid(logits))):
                part.extend(values.numpy()[: 4 - len(part)])
    model.train()
    scores, truths, intensities = (np.concatenate(a) if a else np.zeros(0) for a in (scores, truths, intensities))
    metrics = {
        "valid_loss": sum(losses) / max(sum(weights), 1),
        "valid_f05": best_fbeta(scores, truths)[0],
        "valid_auc": roc_auc(scores, truths),
        "valid_threshold_baseline_f05": best_fbeta(intensities, truths)[0],
        "valid_voxels": int(len(scores)),
    }
    if truth is not None:
        score = counts.summary()
        metrics.update(valid_3d_f05=score["f05"], valid_3d_auc=score["auc"], valid_3d_scan_f05=score["scan_f05"])
    return metrics, picture_parts
