import weakref

import pytest
import torch

from ink3d import InputError
from models import UNet3D, infer_model_args, load_model, save_checkpoint
from models import unet3d
from models.unet3d import UNetArgs

try:
    from pytorch3dunet.unet3d import model as reference
except ImportError:
    reference = None
needs_reference = pytest.mark.skipif(reference is None, reason="pytorch3dunet is the reference UNet (pip install --no-deps pytorch3dunet)")

CONFIGS = [
    dict(f_maps=32, num_levels=5, num_groups=4),
    dict(f_maps=8, num_levels=4, num_groups=4),
    dict(f_maps=16, num_levels=3, num_groups=8),
]


def _reference(f_maps, num_levels, num_groups):
    return reference.UNet3D(1, 1, f_maps=f_maps, num_levels=num_levels, num_groups=num_groups, is_segmentation=False)


@needs_reference
def test_default_has_the_published_parameter_count():
    assert sum(p.numel() for p in UNet3D().parameters()) == 16_470_643
    assert sum(p.numel() for p in _reference(32, 5, 4).parameters()) == 16_470_643


@needs_reference
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("direction", ["ours_to_reference", "reference_to_ours"])
def test_parity_with_pytorch3dunet(config, direction):
    torch.manual_seed(0)
    ours, theirs = UNet3D(**config), _reference(**config)
    source, target = (ours, theirs) if direction == "ours_to_reference" else (theirs, ours)
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: randomize so a swapped norm would show
        for parameter in source.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    target.load_state_dict(source.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.rand(1, 1, 16, 32, 48)  # a different size per axis, each halved 4 times by the default model
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)  # the same operations (with autograd: the training path)
    with torch.no_grad():  # inference's: norms in place, statistics combined in float64; float32's own error
        exact = UNet3D(**config).double()
        exact.load_state_dict(ours.state_dict())
        truth = exact(x.double())
        assert (ours(x) - truth).abs().max() <= 2 * (theirs(x) - truth).abs().max() + 1e-6


def _weights(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    return UNet3D(f_maps=8, num_levels=3).eval()


@pytest.mark.parametrize("form", ["ours", "bare", "model.", "module.", "module.model.", "state_dict", "model_key"])
def test_every_checkpoint_form_loads_identically(tmp_path, small_model, form):
    state = _weights(small_model)
    path = tmp_path / "c.pth"
    if form == "ours":
        save_checkpoint(path, small_model, small_model.args, {"lr": 1e-3}, step=7)
    elif form == "bare":
        torch.save(state, path)
    elif form in ("model.", "module.", "module.model."):
        torch.save({form + key: value for key, value in state.items()}, path)
    elif form == "state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save({"model": state}, path)
    loaded = load_model(path, "cpu")
    assert loaded.args.f_maps == 8 and loaded.args.num_levels == 3
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), small_model(x))


@needs_reference
def test_published_form_from_pytorch3dunet_loads(tmp_path):
    published = _reference(32, 5, 4)
    torch.save({"model." + k: v for k, v in published.state_dict().items()}, tmp_path / "published.pth")
    model = load_model(tmp_path / "published.pth")
    assert model.args == UNetArgs(f_maps=32, num_levels=5, num_groups=4)


def test_missing_key_is_named(tmp_path, small_model):
    state = _weights(small_model)
    del state["decoders.0.basic_module.SingleConv2.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(InputError, match=r"missing \(1\): decoders\.0\.basic_module\.SingleConv2\.conv\.weight") as error:
        load_model(tmp_path / "broken.pth")
    assert "unexpected (1): extra.weight" in str(error.value) and "broken.pth" in str(error.value)


def test_wrong_shape_is_named(tmp_path, small_model):
    save_checkpoint(tmp_path / "c.pth", small_model, dict(small_model.args.to_dict(), f_maps=4), {}, 0)
    with pytest.raises(InputError, match="wrong shape"):
        load_model(tmp_path / "c.pth")


def test_pickled_objects_are_refused_unless_trusted(tmp_path, small_model):
    torch.save({"model": _weights(small_model), "extra": UNetArgs()}, tmp_path / "legacy.pth")
    with pytest.raises(InputError, match="--trust_checkpoint true"):
        load_model(tmp_path / "legacy.pth")
    assert load_model(tmp_path / "legacy.pth", trusted=True).args.f_maps == 8


@pytest.mark.parametrize("trusted", [False, True])
def test_a_file_of_random_bytes_is_not_taken_for_pickled_objects(tmp_path, trusted):
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="random.pth: not a torch checkpoint") as error:
        load_model(tmp_path / "random.pth", trusted=trusted)
    assert "--trust_checkpoint" not in str(error.value)


def test_a_bare_state_dict_that_does_not_fit_the_default_groups_is_named(tmp_path):
    torch.save(UNet3D(f_maps=6, num_levels=2, num_groups=3).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(InputError, match="bare.pth: cannot build its network .*'f_maps': 6.* does not record num_groups"):
        load_model(tmp_path / "bare.pth")
    assert load_model(tmp_path / "bare.pth", num_groups=3).args.f_maps == 6


@pytest.mark.parametrize("f_maps, num_levels", [(4, 2), (8, 4), (16, 3), (32, 5)])
def test_shape_inference(f_maps, num_levels):
    args = infer_model_args(UNet3D(f_maps=f_maps, num_levels=num_levels).state_dict())
    assert (args.f_maps, args.num_levels, args.in_channels, args.out_channels) == (f_maps, num_levels, 1, 1)


def test_odd_input_sizes_keep_their_shape():
    model = UNet3D(f_maps=4, num_levels=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 13, 22, 9)).shape == (2, 1, 13, 22, 9)


def test_joined_features_are_freed_before_the_decoder_convolves_again():
    """At the first level the skip and its join with the upsampled features are the largest tensors: the skip must
    not outlive the join, nor the join the first convolution (the model's peak memory in inference)."""
    skips, joined, alive = {}, [], []
    model = UNet3D(f_maps=4, num_levels=4).eval()
    for level, encoder in enumerate(model.encoders):
        encoder.register_forward_hook(lambda module, inputs, output, level=level: skips.__setitem__(level, weakref.ref(output)))

    def joining(level):
        def hook(module, inputs):
            joined.append(weakref.ref(inputs[0]))
            alive.append((level, skips[level]() is not None, skips[0]() is not None))
        return hook

    for index, decoder in enumerate(model.decoders):  # decoder 0 joins the skip of level num_levels - 2
        decoder.basic_module.SingleConv1.register_forward_pre_hook(joining(2 - index))
        decoder.basic_module.SingleConv2.register_forward_pre_hook(lambda module, inputs: alive.append(joined[-1]() is not None))
    with torch.no_grad():
        model(torch.rand(1, 1, 16, 16, 16))
    # each decoder's own skip and join are gone in turn; the first level's skip waits for the last decoder
    assert alive == [(2, False, True), False, (1, False, True), False, (0, False, False), False]


@pytest.mark.parametrize("shape", [(2, 1, 32, 24, 16), (1, 1, 13, 22, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_forward_equals_the_training_forward_and_leaves_its_input_alone(shape, channels_last):
    """Inference normalizes in place and upsamples into the join (odd sizes through F.interpolate): the same
    function as the training path, to float32's rounding, and the caller's batch is not written."""
    torch.manual_seed(2)
    model = UNet3D(f_maps=8, num_levels=3).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x = torch.rand(shape)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    before = x.clone()
    training = model(x).detach()
    with torch.inference_mode():
        inference = model(x)
    assert torch.equal(x, before)
    assert torch.allclose(inference, training, atol=2e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_in_place_is_a_group_norm_in_float64(channels_last):
    norm = torch.nn.GroupNorm(4, 12)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 20, 18, 16) * 3 + 5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    expected = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        out = unet3d.group_norm_(x, norm)
    assert out.data_ptr() == x.data_ptr() and torch.allclose(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("skip_shape, x_shape", [((2, 3, 8, 6, 4), (2, 5, 4, 3, 2)), ((1, 2, 7, 5, 3), (1, 4, 3, 2, 1))])
def test_join_upsampled_equals_cat_of_interpolate(skip_shape, x_shape):
    skip, x = torch.randn(skip_shape).contiguous(memory_format=torch.channels_last_3d), torch.randn(x_shape)
    expected = torch.cat((skip, torch.nn.functional.interpolate(x, size=skip_shape[2:], mode="nearest")), dim=1)
    joined = unet3d._join_upsampled(skip, x)
    assert torch.equal(joined, expected) and joined.is_contiguous(memory_format=torch.channels_last_3d)


def test_small_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet3D(f_maps=4, num_levels=3)
    x = torch.rand(2, 1, 16, 16, 16)
    y = (x > 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
