"""The modules a sliced model is made of: a weightless RMS norm and the sliced decoder layer."""

from __future__ import annotations

import torch
from torch import nn


class RMSN(nn.Module):
    """RMS norm without a scale (the scale is folded into the next linears).

    It divides by the *dense* width ``mean_dim``, not by the width of its (possibly sliced) input: after a
    rotation the norm of the kept principal components approximates the norm of the whole vector, so
    ``sum(x**2) / D`` is the best estimate of the dense model's mean square. With nothing sliced it is exactly
    the dense RMSNorm. The statistics are computed in fp32 whatever the input dtype.
    """

    def __init__(self, mean_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual stream is ``d_in`` wide on entry and ``d_out`` wide on exit.

    ``self_attn`` and ``mlp`` are the model's own modules, with sliced linears. The residual path carries the
    shortcut matrices ``Q_inᵀ·Q_mid`` (``attn_shortcut``, d_in → d_in) and ``Q_midᵀ·Q_out`` (``mlp_shortcut``,
    d_in → d_out), stored as bias-free linears so they count, save and load like any other weight.
    """

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        d_in: int,
        d_out: int,
        mean_dim: int,
        eps: float,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSN(mean_dim, eps)
        self.post_attention_layernorm = RMSN(mean_dim, eps)
        self.attn_shortcut = nn.Linear(d_in, d_in, bias=False, dtype=dtype, device=device)
        self.mlp_shortcut = nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device)
        self.d_in, self.d_out = int(d_in), int(d_out)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Same call convention as the dense decoder layer; extra arguments go to the attention module."""
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(h, *args, **kwargs)[0]
        hidden_states = self.attn_shortcut(hidden_states) + h
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return self.mlp_shortcut(hidden_states) + h

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"
