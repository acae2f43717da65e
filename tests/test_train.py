import csv
import math

import h5py
import numpy as np
import pytest
import torch

import train
from ink3d import InputError, volume
from ink3d.dataset import BACKGROUND, ScrollSamples, augmentation, label_air
from ink3d.intensity import Normalization, scan_histogram
from ink3d.loss import masked_loss
from ink3d.validation import PICTURE_COLUMN, UNLABELED_GREY, validation_picture
from models import load_model
from models.ema import EMA
from train_scene import train_briefly, training_scene


def test_masked_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0, 0.5])
    loss, count = masked_loss(logits, labels)
    expected = (math.log(2) + math.log(1 + math.exp(-1)) + 0.5 * (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(3)))) / 3
    assert count == 3 and loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1] == 0 and torch.all(logits.grad[[0, 2, 3]] != 0)


def test_all_unlabeled_batch_gives_zero_not_nan():
    logits = torch.randn(5, requires_grad=True)
    loss, count = masked_loss(logits, torch.full((5,), -1.0), dice_weight=1.0)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_dice_term_adds_to_bce():
    logits, labels = torch.tensor([2.0, -2.0, 0.5]), torch.tensor([1.0, 0.0, -1.0])
    bce, _ = masked_loss(logits, labels)
    both, _ = masked_loss(logits, labels, dice_weight=0.5)
    p = torch.sigmoid(torch.tensor([2.0, -2.0]))
    dice = 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1)
    assert both.item() == pytest.approx(bce.item() + 0.5 * dice.item(), rel=1e-6)


def test_background_term_and_label_smoothing_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0, 1.0])
    labels = torch.tensor([1.0, BACKGROUND, 0.0, BACKGROUND, -1.0])

    def bce(x, t):
        return math.log(1 + math.exp(x)) - t * x

    loss, count = masked_loss(logits, labels, background_weight=0.5, label_smoothing=0.1)
    expected = (bce(0.0, 0.95) + bce(-1.0, 0.05)) / 2 + 0.5 * (bce(2.0, 0.05) + bce(3.0, 0.05)) / 2
    assert count == 2 and loss.item() == pytest.approx(expected, rel=1e-6)
    only_air, count = masked_loss(logits, torch.tensor([-1.0, BACKGROUND, -1.0, -1.0, -1.0]), background_weight=2.0)
    assert count == 0 and only_air.item() == pytest.approx(2 * bce(2.0, 0.0), rel=1e-6)
    assert masked_loss(logits, labels)[0].item() == pytest.approx((bce(0.0, 1) + bce(-1.0, 0)) / 2, rel=1e-6)


def test_label_air_never_labels_air_as_ink():
    scan = np.array([10, 10, 10, 200, 200, 200, 60, 61], np.uint8)
    labels = np.array([1.0, 0.25, -1.0, 1.0, 0.0, -1.0, 0.5, 0.5], np.float32)
    assert label_air(labels.copy(), scan, 60, background=True).tolist() == [0, 0, BACKGROUND, 1, 0, -1, 0, 0.5]
    assert label_air(labels.copy(), scan, 60, background=False).tolist() == [0, 0, -1, 1, 0, -1, 0, 0.5]
    assert label_air(labels.copy(), scan, None, background=True).tolist() == labels.tolist()


def test_training_crops_mark_air_as_background_and_never_as_ink(tmp_path):
    root = training_scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 6, train=True, block=16,
                            augment="none", intensity_scale=(1, 1), air_level=100)
    plain = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 6, train=True, block=16,
                          augment="none", intensity_scale=(1, 1))
    for index in range(6):
        image, labels, _ = samples[index]
        original = plain[index][1]
        scan = torch.round(image * 255)
        air = scan <= 100
        assert torch.equal(labels[air & (original >= 0)], torch.zeros(int((air & (original >= 0)).sum())))
        assert torch.all(labels[air & (original < 0)] == BACKGROUND)
        assert torch.equal(labels[~air], original[~air])
        assert air.any() and (~air & (original > 0)).any()


def test_ema_equals_its_definition():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.8)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 13):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and counts a batch
        ema.update(model)
        decay = min(0.8, (1 + n) / (10 + n))
        for name, value in model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value if value.is_floating_point() else value.clone()
    assert ema.updates == 12
    for name, value in ema.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert ema.state_dict()["1.num_batches_tracked"] == 12


def test_checkpoints_hold_ema_and_normalization_that_loaders_use(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run", "--ema_decay", "0.5", "--input_normalization", "percentile", "--percentiles", "2,98")
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    with h5py.File(root / "scan.h5") as file:
        expected = Normalization.of_volume(scan_histogram(file[volume.SCAN]), "percentile", 2, 98)
    assert state["config"]["normalization"] == expected.to_config() and expected != Normalization()
    assert state["ema_updates"] == 4 and not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    ema, raw = load_model(tmp_path / "run" / "last.pth").state_dict(), load_model(tmp_path / "run" / "last.pth", weights="raw").state_dict()
    assert all(torch.equal(ema[k], state["ema"][k]) and torch.equal(raw[k], state["model"][k]) for k in ema)
    with pytest.raises(InputError, match="different input_normalization"):
        train_briefly(root, tmp_path / "run", "--resume", "true", "--ema_decay", "0.5", "--percentiles", "2,98")


def test_validation_scores_the_blocks_against_the_ground_truth(tmp_path):
    root = training_scene(tmp_path)
    with h5py.File(root / "scan.h5") as file:
        scan = file[volume.SCAN][:]
    with h5py.File(root / "truth.h5", "w") as file:
        volume.create_volume(file, volume.GROUND_TRUTH, scan.shape, np.uint8, chunk=16)[:] = (scan > 200) * 255
    train_briefly(root, tmp_path / "run", "--ground_truth", str(root / "truth.h5"))
    with open(tmp_path / "run" / "metrics.csv") as file:
        row = list(csv.DictReader(file))[-1]
    block = scan[16:32, 16:32, 16:32]  # the validation block: ink is exactly its brightest voxels
    assert float(row["valid_3d_scan_f05"]) == pytest.approx(1.0) and 0 < float(row["valid_3d_f05"]) <= 1
    assert (block > 200).any()


def test_validation_picture_columns_and_captions():
    image = np.zeros((1, 1, 3, 4, 4), np.float32)
    image[0, 0, 1] = np.arange(16).reshape(4, 4) / 15
    label = np.full((1, 1, 3, 4, 4), -1, np.float32)
    label[0, 0, 1, 0] = [0, 1, 0.5, -2]
    probability = np.full((1, 1, 3, 4, 4), 0.25, np.float32)
    picture = validation_picture(image, label, probability, title="step 7: F0.5 0.500")
    scale = -(-PICTURE_COLUMN // 4)
    column = 4 * scale + 2
    assert picture.shape == (18 + 18 + column, 3 * column) and picture.dtype == np.uint8
    body = picture[36:]
    assert np.array_equal(body[:4 * scale:scale, :4 * scale:scale], np.rint(np.arange(16).reshape(4, 4) * 17))
    assert body[0, column:column + 4 * scale:scale].tolist() == [0, 255, 128, UNLABELED_GREY]  # 0.5 rounds to 128
    assert body[scale, column] == UNLABELED_GREY and UNLABELED_GREY not in (0, 255)
    assert np.all(body[:4 * scale, 2 * column:2 * column + 4 * scale] == 64)
    assert picture[:18, :40].any() and not picture[:18, column:].any()  # the title, short, at the left
    assert all(picture[18:36, c * column:c * column + 40].any() for c in range(3))  # a caption over each column


def test_lr_schedule():
    assert train.lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert train.lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert train.lr_factor(60, 10, 110) == pytest.approx(0.5)
    assert train.lr_factor(110, 10, 110) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["full", "exact"])
def test_augmentation_keeps_unlabeled_exact_and_alignment(kind):
    rng = np.random.default_rng(0)
    cells = rng.random((6, 6, 6)) > 0.5
    image = np.kron(cells, np.ones((8, 8, 8))).astype(np.float32) * 0.6 + 0.2  # 48^3, blocks of 0.2 / 0.8
    labels = (image > 0.5).astype(np.float32)
    labels[:, :20] = -1
    transform = augmentation(32, kind)
    agreements = []
    for seed in range(6):
        import random

        random.seed(seed)
        out = transform(image=image.copy(), mask=labels.copy())
        image_out, labels_out = out["image"], out["mask"]
        assert image_out.shape == labels_out.shape == (32, 32, 32)
        assert set(np.unique(labels_out)) <= {-1.0, 0.0, 1.0}
        labeled = labels_out >= 0
        agreements.append(((image_out > 0.5) == (labels_out > 0.5))[labeled].mean())
        if kind == "exact":  # voxels are moved, never resampled
            assert set(np.unique(image_out)) <= {np.float32(0.2), np.float32(0.8)}
    assert min(agreements) == 1.0 if kind == "exact" else min(agreements) > 0.9  # full: border voxels are interpolated
    assert augmentation(32, "none") is None


def test_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    model = train.UNet3D(f_maps=4, num_levels=2)
    images = torch.rand(2, 1, 16, 16, 16)
    labels = (images > 0.5).float()
    labels[:, :, :8] = -1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = masked_loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


HOST_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero", "masked_select",
              "unique", "linalg_inv", "repeat_interleave"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Refuses what makes the host wait for a device's result: reading a value, or an op whose output size or
    error check depends on values (boolean indexing, nonzero, ...)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        indices = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
        boolean = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices if isinstance(indices, tuple) else (indices,)))
        if name in HOST_READS or boolean:
            raise AssertionError(f"{name}{' with a boolean index' if boolean else ''} reads a device value on the host")
        return func(*args, **(kwargs or {}))


def _step_setup(device: str, ema_decay: float = 0.5):
    from types import SimpleNamespace
    from ink3d.columns import FIELDS, PAD
    torch.manual_seed(0)
    model = train.UNet3D(in_channels=1, out_channels=1, f_maps=4, num_levels=2, num_groups=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device, enabled=False)
    config = SimpleNamespace(dice_weight=0.5, background_weight=0.3, label_smoothing=0.1, column_weight=1.0, pool_sharpness=2.0,
                             grad_clip=1.0)
    images = torch.rand(2, 1, 16, 16, 16, device=device)
    labels = torch.full((2, 1, 16, 16, 16), -1.0, device=device)
    labels[:, :, 6:10, 6:10, 6:10] = (torch.rand(2, 1, 4, 4, 4, device=device) > 0.5).float()
    labels[:, :, :2] = BACKGROUND
    columns = torch.full((2, 5, FIELDS), float(PAD), device=device)
    columns[:, :3, :3] = torch.tensor([8.0, 7.5, 8.2], device=device)
    columns[:, :3, 3:6] = torch.tensor([1.0, 0.0, 0.0], device=device)
    columns[:, :3, 6] = torch.tensor([1.0, 0.0, 1.0], device=device)
    columns[:, 1, 7:9] = torch.tensor([-1.0, 0.5], device=device)  # a face window
    matrices, shifts = torch.eye(3, device=device).repeat(2, 1, 1), torch.zeros(2, 3, device=device)
    return model, optimizer, scaler, EMA(model, ema_decay), config, images, labels, columns, matrices, shifts


def _state(model, optimizer, ema):
    return ([p.detach().clone() for p in model.parameters()], [v.clone() for s in optimizer.state.values() for v in s.values()],
            [v.clone() for v in ema.state_dict().values()])


def test_train_step_reads_nothing_on_the_host_and_skips_on_the_device():
    model, optimizer, scaler, ema, config, images, labels, columns, matrices, shifts = _step_setup("cpu")
    with HostReads():
        learned = train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, None, 1)
    loss, skipped = learned.tolist()
    assert skipped == 0 and math.isfinite(loss) and loss > 0
    before = _state(model, optimizer, ema)
    nothing = torch.full_like(labels, -1.0)
    nothing[:, :, :2] = BACKGROUND  # background voxels alone are nothing to learn from
    padding = torch.full_like(columns, float("nan"))
    with HostReads():
        result = train.train_step(model, optimizer, scaler, ema, images, nothing, padding, matrices, shifts, config, 1.0, None, 1)
    assert result[1].item() == 1
    after = _state(model, optimizer, ema)
    assert all(torch.equal(a, b) for part_a, part_b in zip(before, after) for a, b in zip(part_a, part_b))
    # the next labeled batch learns again
    train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, None, 1)
    assert not torch.equal(next(model.parameters()), before[0][0])


def test_masked_losses_equal_the_selected_voxels_and_columns():
    from ink3d.columns import column_loss, face_bags, sample_columns
    _, _, _, _, config, images, labels, columns, matrices, shifts = _step_setup("cpu")
    logits = torch.randn_like(images) * 3
    loss, count = masked_loss(logits, labels, dice_weight=0.5)
    labeled = labels >= 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[labeled], labels[labeled])
    probabilities = torch.sigmoid(logits[labeled])
    dice = 1 - (2 * (probabilities * labels[labeled]).sum() + 1) / (probabilities.sum() + labels[labeled].sum() + 1)
    assert count.item() == int(labeled.sum()) and loss.item() == pytest.approx((bce + 0.5 * dice).item(), rel=1e-5)
    samples, counted = sample_columns(logits, columns, 1.0, matrices, shifts)
    masked = column_loss(samples, columns[..., 6], 2.0, 0.5, face_bags(columns, 1.0), counted)
    selected = column_loss(samples[counted], columns[..., 6][counted], 2.0, 0.5, face_bags(columns[counted], 1.0))
    assert counted.sum() == 6 and masked.item() == pytest.approx(selected.item(), rel=1e-6)
    assert column_loss(samples, columns[..., 6], 2.0, 0.5, face_bags(columns, 1.0), torch.zeros_like(counted)).item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the check is CUDA's synchronisation debug mode")
def test_train_step_never_synchronises_on_cuda():
    model, optimizer, scaler, ema, config, images, labels, columns, matrices, shifts = _step_setup("cuda")
    train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, torch.bfloat16, 1)
    torch.cuda.synchronize()  # the first step's lazy initialisations may synchronise
    nothing = torch.full_like(labels, -1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch_labels in (labels, nothing, labels):
            images_, labels_ = train.warp(images, batch_labels, matrices, shifts, 16)
            train.train_step(model, optimizer, scaler, ema, images_, labels_, columns, matrices, shifts, config, 1.0,
                             torch.bfloat16, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
