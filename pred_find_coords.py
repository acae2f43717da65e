"""List the blocks of a label volume that hold labeled voxels: the sampling grid of training.

    python pred_find_coords.py --labels runs/demo/labels_train.h5 --out runs/demo/coords_train.npy --block 64

Writes zyx block origins (int32, shape (N, 3), on the `--block` grid) of blocks with at least
`--min_labeled` labeled voxels (`ink_count > 0`), and with `--out_ink` also those holding ink
(label > 0.5). The label volume is read once, chunk by chunk.
"""


import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import numpy as np
from tqdm import tqdm

from ink3d import blocks, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import atomic_output, check_output, output_lock, refuse_inputs_as_outputs, writing

# --- config ---
LABELS = "runs/demo/labels_train.h5"  # label volume (ink_sum, ink_count)
OUT = "runs/demo/coords_train.npy"  # zyx origins of blocks holding labeled voxels
OUT_INK = ""  # optional: zyx origins of blocks holding ink (label > 0.5)
BLOCK = 128  # block edge: the training patch size
MIN_LABELED = 1  # labeled voxels a block needs
OVERWRITE = False  # replace existing outputs


def count_per_block(ink_sum, ink_count, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled and ink voxel counts of every block of the grid, reading each chunk once."""
    grid = tuple(-(-size // block) for size in ink_count.shape)
    labeled = np.zeros(grid, np.int64)
    ink = np.zeros(grid, np.int64)
    chunks = list(blocks.iter_blocks(ink_count.shape, ink_count.chunks))
    for box in tqdm(chunks, unit="chunk", desc="pred_find_coords"):
        count = ink_count[box]
        where = np.nonzero(count)
        if not where[0].size:
            continue
        label = ink_sum[box][where] / count[where]
        block_index = tuple((axis + piece.start) // block for axis, piece in zip(where, box))
        flat = np.ravel_multi_index(block_index, grid)
        labeled += np.bincount(flat, minlength=labeled.size).reshape(grid)
        ink += np.bincount(flat[label > 0.5], minlength=ink.size).reshape(grid)
    return labeled, ink


def origins(counts: np.ndarray, minimum: int, block: int) -> np.ndarray:
    return (np.argwhere(counts >= minimum) * block).astype(np.int32)


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"labels": config.labels}, {"out": config.out, "out_ink": config.out_ink})
    with output_lock(*[path for path in (config.out, config.out_ink) if path]):
        return find_coords(config)


def find_coords(config) -> np.ndarray:
    check_output(config.out, config.overwrite)
    if config.out_ink:
        check_output(config.out_ink, config.overwrite)
    file, ink_count = volume.open_dataset(config.labels, volume.INK_COUNT)
    sum_file, ink_sum = volume.open_dataset(config.labels, volume.INK_SUM)
    with file, sum_file:
        labeled, ink = count_per_block(ink_sum, ink_count, config.block)
    coords = origins(labeled, config.min_labeled, config.block)
    ink_blocks = origins(ink, 1, config.block)
    for path, values in ((config.out, coords), (config.out_ink, ink_blocks)):
        if path:
            with writing(path, resumable=False), atomic_output(path) as temporary, open(temporary, "wb") as stream:
                np.save(stream, values)
    save_config(config, config_path_for(config.out))
    print(f"{len(coords)} blocks of {config.block}^3 hold >= {config.min_labeled} labeled voxels, "
          f"{len(ink_blocks)} hold ink -> {config.out}")
    return coords


if __name__ == "__main__":
    run_main(main)
