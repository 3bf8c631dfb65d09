"""Exponential moving average of the trainable weights (kept in float32)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    def _decay(self) -> float:
        # Warm-up as in diffusers' EMAModel: early averages are not dominated by the random init.
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.nn.Parameter]) -> None:
        d = self._decay()
        for n, p in named_params.items():
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, named_params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into the live parameters."""
        backup = {n: p.detach().clone() for n, p in named_params.items()}
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named_params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the trainable parameters: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}
