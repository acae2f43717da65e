"""Exponential moving average (EMA) of a model's weights: smoother weights to validate and predict with."""

import copy

import torch

from models.checkpoint import unwrap


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (1-based): `decay`, lowered early on so that the average
    is not dominated by the initial weights of a short run."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """After each update n: ema = d_n * ema + (1 - d_n) * weights, d_n = ema_decay(decay, n), for every
    floating-point parameter and buffer (others are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One update; where `skipped` (a bool tensor on the model's device) is true the average is left as it
        is, decided on the device (the update still counts towards the decay's warm-up)."""
        self.updates += 1
        weight = 1 - ema_decay(self.decay, self.updates)
        if skipped is not None:
            weight = torch.where(skipped, 0.0, weight)
        current = unwrap(model).state_dict()
        for name, average in self.model.state_dict().items():
            if average.dtype.is_floating_point:  # a tensor weight must have the average's dtype
                average.lerp_(current[name].detach(), weight if skipped is None else weight.to(average.dtype))
            else:
                average.copy_(current[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
