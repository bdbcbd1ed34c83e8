"""Tiny models the unit tests share: small enough for dense float64 answers, each exposing ``last_layer``."""

from __future__ import annotations

import torch
from torch import nn


class LogReg(nn.Module):
    """Multinomial logistic regression (with bias); its only layer is the last layer."""

    def __init__(self, d: int = 3, c: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(d, c)

    @property
    def last_layer(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLP(nn.Module):
    """d → width (tanh) → c as an nn.Sequential; ``last_layer`` is a property (no double registration)."""

    def __init__(self, d: int = 3, width: int = 5, c: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, c))

    @property
    def last_layer(self) -> nn.Module:
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyMLP(nn.Module):
    """4 → 5 (tanh) → 3, the final nn.Linear registered as ``last_layer``."""

    def __init__(self, d_in: int = 4, width: int = 5, c: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, width)
        self.last_layer = nn.Linear(width, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(torch.tanh(self.hidden(x)))
