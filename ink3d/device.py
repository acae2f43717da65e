"""GPU speed options shared by training and inference: memory format, autocast dtype, compile."""

import contextlib
import os

import torch
import torch.distributed as dist

from ink3d import InputError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; a CUDA device that is not there is refused by name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(f"--device {name}: " + (f"this machine has {count} CUDA devices (0..{count - 1})" if count
                                                      else "no CUDA device is available here; use --device cpu"))
    elif device.type != "cpu":
        raise InputError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    return device


def switch(value: str, flag: str, on_cuda: bool, on_cpu: bool, device: torch.device) -> bool:
    """A true / false / auto setting; auto takes the measured best for the device."""
    lowered = str(value).strip().lower()
    if lowered == "auto":
        return on_cuda if device.type == "cuda" else on_cpu
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InputError(f"{flag} {value!r}: choose auto, true or false")


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """'auto': bf16 on CUDA where supported, else fp16 on CUDA; fp32 (None) on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype {name!r}: choose auto, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = False, compile: bool = False):
    """Move to `device`, optionally in channels_last_3d memory format and through torch.compile."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if compile:
        model = torch.compile(model)
    return model


def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A host batch on `device`, asynchronously when the host memory is pinned."""
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last_3d) if channels_last else batch


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: one process on `device_name`, or a torchrun rank on its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
