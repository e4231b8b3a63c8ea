"""Parameter accounting for dense and sliced Llama-like models, without building them.

A sliced model (see :mod:`dynslice.core.slicing`) with input widths ``d_0..d_{L-1}`` and final width ``d_L`` has:

* embedding ``V·d_0`` (always untied from the head);
* layer ``i``: q ``d_i·Hq·hd``, k and v ``d_i·Hkv·hd`` each (their biases keep their size), o ``Hq·hd·d_i``
  (bias ``d_i``), gate and up ``d_i·I`` each (biases ``I``), down ``I·d_{i+1}`` (bias ``d_{i+1}``); the
  residual-stream norms are folded into the linears and carry no parameters; Qwen3's per-head q/k norms
  (``2·hd``) sit inside the attention, are not folded, and keep their size;
* shortcut matrices per layer: attention ``d_i·d_i`` and MLP ``d_i·d_{i+1}``;
* LM head ``d_L·V`` (untied), no final-norm parameters.

The dense count is what ``sum(p.numel() for p in model.parameters())`` reports (a tied head counted once).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dynslice.core.checks import check_choice, check_int

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: What a parameter budget counts: weights plus shortcut matrices, or the weights alone.
COUNTS = ("total", "weights")


@dataclass(frozen=True)
class ArchDims:
    """The shapes that determine a dense Llama-like model's parameter count."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm of width head_dim on q and on k in every layer

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim"):
            check_int(name, getattr(self, name), 1)

    @classmethod
    def from_config(cls, config: Any) -> ArchDims:
        """Read the dimensions from a transformers ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` or
        ``Qwen3Config``."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config: model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        if model_type in ("llama", "qwen3"):  # attention_bias applies to q, k, v and o
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
            mlp_bias = bool(getattr(config, "mlp_bias", False))
        elif model_type == "qwen2":  # q, k, v always carry a bias; o and the MLP never do
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:  # mistral: no biases at all
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            vocab=int(config.vocab_size),
            hidden=hidden,
            layers=int(config.num_hidden_layers),
            intermediate=int(config.intermediate_size),
            heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a sliced model: ``weights`` (every linear, bias and embedding) plus ``shortcuts``."""

    weights: int
    shortcuts: int

    @property
    def total(self) -> int:
        return self.weights + self.shortcuts

    def to_json(self) -> dict:
        return {"weights": self.weights, "shortcuts": self.shortcuts, "total": self.total}


def _qkv_out(dims: ArchDims) -> int:
    """Output features of q, k and v together."""
    return (dims.heads + 2 * dims.kv_heads) * dims.head_dim


def dense_params(dims: ArchDims) -> int:
    """Parameter count of the dense model (a tied LM head shares the embedding and is counted once)."""
    d, i_, v = dims.hidden, dims.intermediate, dims.vocab
    attn_width = dims.heads * dims.head_dim
    per_layer = d * _qkv_out(dims) + attn_width * d + 3 * d * i_ + 2 * d  # linears + two RMSNorm weights
    per_layer += _qkv_out(dims) * dims.qkv_bias + d * dims.o_bias + (2 * i_ + d) * dims.mlp_bias
    per_layer += 2 * dims.head_dim * dims.qk_norm
    head = 0 if dims.tied else v * d
    return v * d + dims.layers * per_layer + d + head


def _sliced_terms(dims: ArchDims, widths: Sequence[float], final_width: float) -> tuple[float, float]:
    """``(weights, shortcuts)`` as a polynomial in the widths; works for non-integer widths too."""
    i_, v = dims.intermediate, dims.vocab
    attn_width = dims.heads * dims.head_dim
    outs = list(widths[1:]) + [final_width]
    weights = v * widths[0] + final_width * v
    shortcuts = 0.0
    fixed_bias = _qkv_out(dims) * dims.qkv_bias + 2 * i_ * dims.mlp_bias + 2 * dims.head_dim * dims.qk_norm
    for d_in, d_out in zip(widths, outs, strict=True):
        weights += d_in * _qkv_out(dims) + attn_width * d_in + 2 * d_in * i_ + i_ * d_out
        weights += fixed_bias + d_in * dims.o_bias + d_out * dims.mlp_bias
        shortcuts += d_in * d_in + d_in * d_out
    return weights, shortcuts


def check_width(name: str, width: Any, hidden: int) -> int:
    """One residual-stream width: an integer with ``1 <= width <= hidden``."""
    return check_int(name, width, 1, hidden, allowed=f"1 <= width <= {hidden} (the hidden size)")


def validate_widths(widths: Sequence[int], num_layers: int, hidden: int, name: str = "widths") -> tuple[int, ...]:
    """Check one integer width per decoder layer in ``[1, hidden]`` (a sequence, array or tensor); return a tuple."""
    values = widths.tolist() if hasattr(widths, "tolist") else widths
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}: expected a sequence of {num_layers} integers, got {type(widths).__name__}")
    if len(values) != num_layers:
        raise ValueError(f"{name}: expected one width per decoder layer ({num_layers}), got {len(values)}")
    return tuple(check_width(f"{name}[{i}]", w, hidden) for i, w in enumerate(values))


def sliced_params(dims: ArchDims, widths: Sequence[int], final_width: int | None = None) -> ParamCount:
    """Parameter count of the model sliced to input widths ``widths`` (final width ``final_width``, default D)."""
    widths = validate_widths(widths, dims.layers, dims.hidden)
    final = dims.hidden if final_width is None else check_width("final_width", final_width, dims.hidden)
    weights, shortcuts = _sliced_terms(dims, widths, final)
    return ParamCount(weights=int(weights), shortcuts=int(shortcuts))


def sliced_params_continuous(
    dims: ArchDims, widths: Iterable[float], final_width: float | None = None, count: str = "total"
) -> float:
    """The same polynomial as :func:`sliced_params` at real-valued widths (used to solve parameter budgets).

    ``count`` is ``"total"`` (weights plus shortcuts) or ``"weights"``.
    """
    check_choice("count", count, COUNTS)
    weights, shortcuts = _sliced_terms(dims, list(widths), dims.hidden if final_width is None else final_width)
    return weights + shortcuts if count == "total" else weights
