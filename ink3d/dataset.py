"""Training and validation samples: scan crops with sparse 3D labels (-1 = unlabeled).

A training sample is drawn around a labeled block origin with random jitter: a crop 1.5x the
patch is read, augmented (volumentations-3D) and ends at `patch`^3; or, with `on_device`, the raw
uint8 crop and its labels are handed over with the sample's spatial transform (ink3d.augment),
which the training loop applies to the whole batch where the model runs. Each sample is a pure
function of its index and the seed, whichever worker makes it, so a resumed run sees the same
stream. The HDF5 files are opened once per worker process.

Air holds no ink. With an air level, labeled voxels whose scan value is at or below it are
labeled 0 whatever their segment pixel says, and in training crops every other air voxel is
marked BACKGROUND (-2): known not to be ink, weighed in the loss apart from the labeled band.

With `columns`, a sample also carries up to that many of the labeled pixels' columns whose point
lies in its crop (ink3d.columns), and only voxels that no ink column reaches keep a voxel label
(0): where along an ink column the ink lies is for the model to learn from the pooled columns.
Such samples always come in the device form (raw crop and transform), so that the columns move
with the crop's augmentation.
"""

import os
import random

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from volumentations import Compose, Flip, RandomCrop, RandomResizedCrop, RandomRotate90, Rotate

from ink3d import volume
from ink3d.augment import draw_affine
from ink3d.columns import COLUMNS, FIELDS, ColumnReader, fixed_size, with_face_windows
from ink3d.intensity import Normalization
from ink3d.memory import reuse_freed_memory

UNLABELED = -1.0
BACKGROUND = -2.0


def label_air(labels: np.ndarray, scan: np.ndarray, air_level: int | None, background: bool) -> np.ndarray:
    """Labels with air (scan <= air_level) set to 0 where labeled and, with `background`, to BACKGROUND elsewhere."""
    if air_level is None:
        return labels
    air = scan <= air_level
    labeled = labels >= 0
    labels[air & labeled] = 0
    if background:
        labels[air & ~labeled] = BACKGROUND
    return labels


def loader_worker_init(worker_id: int) -> None:
    """A DataLoader worker's start: it reads and frees crops of the same sizes sample after sample, so the memory they
    free is kept for the next (ink3d.memory) rather than handed back and zeroed afresh by the system for each."""
    reuse_freed_memory()


def read_labels(ink_sum, ink_count, origin, shape) -> np.ndarray:
    """ink_sum / ink_count over a box, -1 where nothing is labeled (or outside the volume)."""
    total = volume.read_crop(ink_sum, origin, shape, fill=0)
    count = volume.read_crop(ink_count, origin, shape, fill=0)
    labels = np.full(shape, UNLABELED, np.float32)
    np.divide(total, count, out=labels, where=count > 0)
    return labels


AUGMENTATIONS = ("full", "exact", "none")


def augmentation(patch: int, kind: str = "full") -> Compose | None:
    """`full`: step 4 of the method in docs/DESIGN.md. The mask (labels) is moved with nearest interpolation and filled with -1.
    `exact`: 90-degree turns, flips and a random crop only, which move voxels without resampling
    them, so the scan's finest texture survives. `none`: no augmentation (None).

    Flips use one fixed axis each: volumentations' Flip with a random axis draws the axis
    separately for the image and the mask, which would misalign them.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return None
    exact = [RandomRotate90(p=0.5), Flip(axis=(0,), p=0.5), Flip(axis=(1,), p=0.5), Flip(axis=(2,), p=0.5)]
    if kind == "exact":
        return Compose(exact + [RandomCrop((patch,) * 3, p=1.0)], p=1.0)
    return Compose([
        Rotate((-15, 15), (-15, 15), (-15, 15), interpolation=1, border_mode="constant", value=0, mask_value=UNLABELED, p=0.5),
        *exact,
        RandomResizedCrop((patch,) * 3, scale_limit=(0.75, 1.33), interpolation=1, resize_type=0, p=1.0),
    ], p=1.0)


class ScrollSamples(Dataset):
    """Samples of (image (1, P, P, P) float32 in [0, 1] (x intensity scale), label (1, P, P, P) with -1
    unlabeled and BACKGROUND air, number of re-draws it took)."""

    def __init__(self, volume_path, labels_path, origins, patch: int, length: int, *, train: bool, block: int,
                 seed: int = 0, stream: int = 0, min_labeled: int = 1, max_tries: int = 10, augment: str = "full",
                 intensity_scale=(0.4, 2.0), normalization: Normalization = Normalization(), air_level: int | None = None,
                 level: int = 0, on_device: bool = False, columns: int = 0, face_depth: float = 0.0, ink_reach: float = 0.0):
        self.volume_path, self.labels_path = str(volume_path), str(labels_path)
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 3)
        if len(self.origins) == 0:
            raise ValueError(f"no block origins for {labels_path}")
        self.patch, self.length, self.train, self.block = patch, length, train, block
        self.seed, self.stream = seed, stream
        self.min_labeled, self.max_tries = min_labeled, max_tries
        if on_device and augment != "full" and not columns:
            raise ValueError(f"augmentation {augment!r} resamples nothing: its device form is for samples with columns")
        self.columns, self.face_depth, self.ink_reach = columns, face_depth, ink_reach
        self.on_device = (on_device or bool(columns)) and train
        self.augment_kind = augment
        self.augment = augmentation(patch, augment) if train and not self.on_device else None
        self.intensity_scale = intensity_scale
        self.normalization, self.air_level, self.level = normalization, air_level, level
        self._files = self._scan = self._columns = None
        self._pid = None

    def __len__(self) -> int:
        return self.length

    def _datasets(self):
        """The scan (HDF5 or zarr) and label datasets, opened once in each process that reads."""
        if self._pid != os.getpid():
            scan_file, self._scan = volume.open_dataset(self.volume_path, volume.SCAN, level=self.level)
            self._files = (scan_file, h5py.File(self.labels_path, "r"))
            if self.columns:
                self._columns = ColumnReader(self._files[1][COLUMNS], self._scan.shape)
            self._pid = os.getpid()
        label_file = self._files[1]
        return self._scan, label_file[volume.INK_SUM], label_file[volume.INK_COUNT]

    def __getitem__(self, index: int):
        scan, ink_sum, ink_count = self._datasets()
        if not self.train:
            origin = self.origins[index % len(self.origins)]
            image = volume.read_crop(scan, origin, (self.patch,) * 3)
            labels = self._voxel_labels(read_labels(ink_sum, ink_count, origin, (self.patch,) * 3))
            labels = label_air(labels, image, self.air_level, background=False)
            sample = self._tensors(self.normalization(image), labels, 0)
            if self.columns:
                sample += (self._sample_columns(origin, self.patch, image, np.random.default_rng([self.seed, index])),)
            return sample
        rng = np.random.default_rng([self.seed, self.stream, index])
        random.seed(int(rng.integers(2**62)))  # volumentations draws from the random module
        crop = int(round(1.5 * self.patch))
        inner = slice((crop - self.patch) // 2, (crop - self.patch) // 2 + self.patch)
        for redraws in range(self.max_tries):  # bounded: after max_tries the last crop is used as it is
            origin = self.origins[rng.integers(len(self.origins))]
            centre = origin + self.block // 2 + rng.integers(-self.block // 2, self.block // 2 + 1, size=3)
            corner = centre - crop // 2
            labels = read_labels(ink_sum, ink_count, corner, (crop,) * 3)
            if (labels[inner, inner, inner] >= 0).sum() >= self.min_labeled:
                break
        image = volume.read_crop(scan, corner, (crop,) * 3)
        labels = label_air(self._voxel_labels(labels), image, self.air_level, background=True)
        if self.on_device:  # the raw crop, its labels and the sample's transform: ink3d.augment.warp runs on the batch
            matrix, offset = draw_affine(rng, crop, self.patch, self.augment_kind)
            scale = np.float32(rng.uniform(*self.intensity_scale))
            sample = (torch.from_numpy(image)[None], torch.from_numpy(labels)[None], redraws,
                      torch.from_numpy(matrix), torch.from_numpy(offset), torch.tensor(scale))
            if self.columns:
                sample += (self._sample_columns(corner, crop, image, rng),)
            return sample
        image = self.normalization(image)
        if self.augment is not None:
            out = self.augment(image=image, mask=labels)
            image, labels = out["image"], out["mask"]
        else:
            image, labels = image[inner, inner, inner], labels[inner, inner, inner]
        image = image * np.float32(rng.uniform(*self.intensity_scale))
        return self._tensors(image, labels, redraws)

    def _sample_columns(self, corner, size: int, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """At most `columns` of the columns whose point lies in the box, with their face windows."""
        chosen = fixed_size(self._columns.in_box(corner, size), self.columns, rng)
        used = ~np.isnan(chosen[:, 0])
        out = np.full((len(chosen), FIELDS), np.nan, np.float32)
        out[used] = with_face_windows(chosen[used], image, self._columns.band, self.air_level, self.face_depth, self.ink_reach)
        return torch.from_numpy(out)

    def _voxel_labels(self, labels: np.ndarray) -> np.ndarray:
        """With columns, a voxel that an ink column reaches is unlabeled: its column says where ink may be, not that it is."""
        if self.columns:
            labels[labels > 0] = UNLABELED
        return labels

    @staticmethod
    def _tensors(image, labels, redraws: int):
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None]
        return image, labels, redraws
