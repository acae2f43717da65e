"""Checkpoints: save in the pipeline's format, load any accepted form and rebuild the network.

Accepted: `{"model": state_dict, "model_args": {...}, ...}` (ours, optionally with `"ema"`: the EMA
of the weights, which loaders return unless asked for the raw weights), `{"state_dict": ...}`,
a bare state_dict, and keys prefixed `model.` (the published 3D ink checkpoint),
`module.` or `module.model.` (DataParallel / DistributedDataParallel) or `_orig_mod.`
(torch.compile). Without `model_args`, `f_maps` and `num_levels` are read off the tensor
shapes; `num_groups` is invisible in the weights and defaults to 4 (the published model's).
"""

import hashlib
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ink3d import InputError
from ink3d.files import atomic_output
from models.unet3d import UNet3D, UNetArgs

PREFIXES = ("module.", "model.", "_orig_mod.")
_ENCODER = re.compile(r"^encoders\.(\d+)\.")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a network's weights (names and bytes, in name order): identifies the model whatever its file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path, model, model_args, config, step, **extra) -> None:
    """Write `{"model", "model_args", "config", "step", **extra}`; a crash never leaves half a file."""
    if isinstance(model_args, UNetArgs):
        model_args = model_args.to_dict()
    payload = {"model": unwrap(model).state_dict(), "model_args": dict(model_args), "config": dict(config), "step": int(step), **extra}
    buffer = io.BytesIO()  # serialised first: a full disk then fails as the file is written, with the system's reason
    torch.save(payload, buffer)
    with atomic_output(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())


def read_checkpoint(path, trusted: bool = False) -> dict:
    """The raw checkpoint object, loaded without running pickled code unless `trusted`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    with open(path, "rb") as stream:
        pickled = stream.read(1) == b"\x80"  # a pickle's protocol opcode; torch's zip format is checked below
    if not (pickled or zipfile.is_zipfile(path)):
        raise InputError(f"{path}: not a torch checkpoint (neither torch's zip format nor a pickle); the file is damaged or of another kind")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        if trusted:
            raise InputError(f"{path}: not a readable torch checkpoint ({str(error).splitlines()[0]})") from None
        raise InputError(
            f"{path}: the checkpoint holds Python objects beyond tensors and plain values, which are not loaded "
            f"by default because unpickling can run code ({str(error).splitlines()[0]}). If you trust the file, "
            f"pass --trust_checkpoint true."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable torch checkpoint ({error})") from None


WEIGHTS = ("ema", "raw")  # which weights of a checkpoint with both: the EMA (default) or the raw trained ones


def extract_state_dict(checkpoint, path="checkpoint", weights: str = "ema") -> tuple[dict, dict | None]:
    """(state_dict with wrapper prefixes removed, model_args or None) from any accepted form; `weights`
    picks the EMA or the raw weights of a checkpoint that holds both."""
    if weights not in WEIGHTS:
        raise InputError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(checkpoint).__name__}")
    model_args = checkpoint.get("model_args")
    state = checkpoint
    for key in ("ema", "model", "state_dict") if weights == "ema" else ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"{path}: no state_dict found (top-level keys: {', '.join(map(str, checkpoint)) or 'none'})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                stripped = True
    return state, model_args


def infer_model_args(state: dict) -> UNetArgs:
    """UNet settings read off the tensor shapes of a state_dict."""
    try:
        first = state["encoders.0.basic_module.SingleConv1.conv.weight"]
        f_maps = state["encoders.0.basic_module.SingleConv2.conv.weight"].shape[0]
        out_channels = state["final_conv.weight"].shape[0]
    except KeyError as error:
        raise InputError(f"state_dict is not a UNet3D: no key {error}") from None
    num_levels = 1 + max(int(m.group(1)) for key in state if (m := _ENCODER.match(key)))
    return UNetArgs(in_channels=first.shape[1], out_channels=out_channels, f_maps=f_maps, num_levels=num_levels)


def load_weights(model: torch.nn.Module, state: dict, path="checkpoint") -> None:
    """Load strictly; any mismatch raises one error listing missing, unexpected and wrongly-shaped keys."""
    expected = unwrap(model).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key} {tuple(state[key].shape)} (model: {tuple(expected[key].shape)})"
        for key in set(expected) & set(state) if state[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        lines = [f"{path}: checkpoint does not match the model"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        raise InputError("\n".join(lines))
    unwrap(model).load_state_dict(state, strict=True)


def read_state_dict(path, trusted: bool = False, weights: str = "ema") -> tuple[dict, dict | None]:
    """(state_dict, model_args or None) of a checkpoint file in any accepted form."""
    return extract_state_dict(read_checkpoint(path, trusted), path, weights)


def load_model(path, device="cpu", trusted: bool = False, num_groups: int | None = None, weights: str = "ema") -> UNet3D:
    """Rebuild the network from a checkpoint file alone, in eval mode on `device`."""
    return model_from_checkpoint(read_checkpoint(path, trusted), path, device, num_groups, weights)


def model_from_checkpoint(checkpoint, path="checkpoint", device="cpu", num_groups: int | None = None,
                          weights: str = "ema") -> UNet3D:
    """The network of an already read checkpoint object, in eval mode on `device`."""
    state, model_args = extract_state_dict(checkpoint, path, weights)
    args = UNetArgs(**model_args) if model_args else infer_model_args(state)
    if num_groups is not None:
        args.num_groups = num_groups
    try:
        model = UNet3D(**args.to_dict())
    except ValueError as error:  # GroupNorm: channels not divisible by the groups
        recorded = "" if model_args else " (the checkpoint does not record num_groups, so the default 4 was assumed)"
        raise InputError(f"{path}: cannot build its network with {args.to_dict()}: {error}{recorded}") from None
    load_weights(model, state, path)
    return model.to(device).eval()
