"""Score a prediction volume voxel by voxel against a ground-truth ink volume (the synthetic scroll's).

    python score_3d.py --predictions runs/demo/predictions.h5 --ground_truth runs/demo/scroll/ground_truth.h5 \\
        --volume runs/demo/scan.h5 --out runs/demo/score_3d.json
    python score_3d.py ... --roi 0:160,0:128,128:256          # one region, e.g. around the held-out segment

Prints and writes (as JSON) the F0.5 at the best threshold and the ROC AUC of the prediction over
every voxel of the region, beside the same scores of the scan intensity alone (ink is denser
than most papyrus), and the prediction's median and 95th percentile in air (scan at or below
the air level), papyrus without ink, and ink. Read block by block: the volumes stream.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json

from ink3d import InputError, blocks, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import atomic_output, check_output, output_lock, refuse_inputs_as_outputs, writing
from ink3d.intensity import scan_air_level
from ink3d.metrics import score_volume

# --- config ---
PREDICTIONS = "runs/demo/predictions.h5"  # prediction volume (dataset predictions, uint8)
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
GROUND_TRUTH = "runs/demo/scroll/ground_truth.h5"  # ground-truth ink volume (dataset ink, > 0 = ink)
VOLUME = "runs/demo/scan.h5"  # scan volume: the intensity baseline and the air / papyrus split
ROI = ""  # z0:z1,y0:y1,x0:x1 to score; empty = the whole volume
AIR_LEVEL = "auto"  # scan values at or below this are air (uint8): auto (the valley between the air and papyrus modes of the scan's histogram), otsu, or a number
OUT = ""  # optional JSON file for the scores
OVERWRITE = False  # replace an existing --out


def summary_line(score: dict) -> str:
    def show(key: str) -> str:
        return "n/a" if score[key] is None else f"{score[key]:.{3 if 'auc' in key else 2}f}"

    return (f"voxel F0.5 {score['f05']:.3f} (AUC {show('auc')}) vs scan threshold {score['scan_f05']:.3f} "
            f"(AUC {show('scan_auc')}); median / p95 prediction: air {show('air_median')} / {show('air_p95')}, "
            f"papyrus {show('papyrus_median')} / {show('papyrus_p95')}, ink {show('ink_median')} / {show('ink_p95')}")


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"predictions": config.predictions, "ground_truth": config.ground_truth, "volume": config.volume},
                             {"out": config.out})
    with output_lock(*([config.out] if config.out else [])):
        return score(config)


def score(config) -> dict:
    if config.out:
        check_output(config.out, config.overwrite)
    prediction_file, predictions = volume.open_dataset(config.predictions, volume.PREDICTIONS, level=config.level)
    truth_file, truth = volume.open_dataset(config.ground_truth, volume.GROUND_TRUTH, level=config.level)
    scan_file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level)
    with prediction_file, truth_file, scan_file:
        for name, dataset in ((config.ground_truth, truth), (config.volume, scan)):
            if dataset.shape != predictions.shape:
                raise InputError(f"{name}: shape {dataset.shape} differs from the predictions' {predictions.shape}")
        air_level = scan_air_level(config.air_level, scan)
        if air_level is None:
            raise InputError("--air_level none: the score splits the voxels without ink into air and papyrus; give auto, otsu or a number")
        region = blocks.parse_roi(config.roi, scan.shape)
        result = score_volume(predictions, truth, scan, air_level, region)
    result.update(air_level=air_level, roi=config.roi)
    print(f"3D score{' of ' + config.roi if config.roi else ''}: {summary_line(result)}; air: the scan at or below {air_level} "
          f"(--air_level {config.air_level})")
    if config.out:
        with writing(config.out, resumable=False), atomic_output(config.out) as temporary:
            temporary.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        save_config(config, config_path_for(config.out))
    return result


if __name__ == "__main__":
    run_main(main)
