"""Architecture adapters: the one place that knows a decoder's anatomy.

The slicing engine, the LR score, layer deletion and streaming reach a model only through its adapter: where the
embeddings, decoder layers, final norm and head live, how the decoder body is run, which linears read and write
the residual stream, how norms are swapped, and the checkpoint key names of each part. A new Llama-like
architecture is one entry in :data:`ADAPTERS`. Adapters are chosen by the model's class, never by its name or path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynslice.core.layers import SlicedDecoderLayer

#: Architectures known to break rotation invariance (or without an adapter yet), with the reason given to the user.
UNSUPPORTED_REASONS: dict[str, str] = {
    "Gemma": "Gemma scales its RMSNorms by (1 + w) instead of w and multiplies the token embeddings by "
    "sqrt(hidden_size) inside a scaled-embedding module; both commute with a rotation, but folding w instead of "
    "1 + w and rebuilding a plain embedding would change the function, so no adapter is written for it yet",
    "Gemma2": "Gemma-2 puts post-attention and post-MLP norms on the residual branch, breaking rotation invariance",
    "Gemma3": "Gemma-3 puts post-attention and post-MLP norms on the residual branch, breaking rotation invariance",
    "Phi3": "Phi-3 fuses q/k/v and gate/up into single linears; no adapter is written for it yet",
    "GPT2": "GPT-2 uses LayerNorm with bias and Conv1D linears; no adapter is written for it yet",
}


@dataclass(frozen=True)
class LayerParts:
    """The pieces of one pre-norm decoder layer that rotate-and-slice touches.

    ``attn_block`` is called as ``attn_block(hidden, **layer_kwargs)[0]`` and ``mlp_block`` as
    ``mlp_block(hidden)``; ``attn_in`` and ``mlp_in`` read the residual stream, ``attn_out`` and ``mlp_out`` write
    it.
    """

    attn_block: nn.Module
    attn_norm: nn.Module
    attn_in: tuple[nn.Linear, ...]
    attn_out: nn.Linear
    mlp_block: nn.Module
    mlp_norm: nn.Module
    mlp_in: tuple[nn.Linear, ...]
    mlp_out: nn.Linear


@dataclass(frozen=True)
class WeightNames:
    """Checkpoint (safetensors) key names of a dense model's parts; ``layer_prefix`` has ``{}`` for the index."""

    embeddings: str
    final_norm: str
    head: str
    layer_prefix: str

    def layer(self, index: int) -> str:
        """Key prefix of decoder layer ``index`` (ends with a dot)."""
        return self.layer_prefix.format(index)


def mark_untied(config) -> None:
    """Record in a transformers config (and its text config) that the LM head no longer shares the embedding."""
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False


class _BodyModule:
    """A module of the decoder body (``model.model.<attr>``), read and replaced through the adapter."""

    def __init__(self, attr: str, doc: str) -> None:
        self.attr, self.__doc__ = attr, doc

    def __get__(self, adapter: LlamaLikeAdapter | None, owner: type | None = None):
        return self if adapter is None else getattr(adapter._body, self.attr)

    def __set__(self, adapter: LlamaLikeAdapter, module: nn.Module) -> None:
        setattr(adapter._body, self.attr, module)


class LlamaLikeAdapter:
    """Adapter for pre-RMSNorm decoders with ``q/k/v/o_proj`` attention and ``gate/up/down_proj`` SwiGLU MLP.

    Covers Llama (Llama-2/3, SmolLM2), Mistral, Qwen2 and Qwen3. Qwen2's q/k/v biases sit on the output side of
    input-rotated linears and are left as they are. Qwen3's per-head ``q_norm``/``k_norm`` act on the outputs of
    q_proj/k_proj in head space; rotating those projections' *inputs* leaves their outputs unchanged, so the
    head-space norms stay as they are inside the attention module.
    """

    #: Key names in a transformers checkpoint of this family.
    WEIGHT_NAMES = WeightNames(
        embeddings="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        head="lm_head.weight",
        layer_prefix="model.layers.{}.",
    )
    #: Attributes of a dense decoder layer that model code may read; a sliced layer gets copies.
    LAYER_ATTRS = ("attention_type", "layer_idx", "layer_type")

    def __init__(self, model: nn.Module) -> None:
        # A transformers model: its parts (``model.model``, ``lm_head``, ``config``) are found by name, which torch's
        # stubs can only type as ``Tensor | Module``; knowing what they are is this class's job.
        self.model: Any = model

    @property
    def _body(self) -> nn.Module:
        return self.model.model

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rms_eps(self) -> float:
        return float(getattr(self.model.config, "rms_norm_eps", 1e-6))

    @property
    def weight_names(self) -> WeightNames:
        return self.WEIGHT_NAMES

    # -- the residual stream's ends ----------------------------------------------------------------------------

    embeddings = _BodyModule("embed_tokens", "the token embedding (nn.Embedding)")
    layers = _BodyModule("layers", "the decoder layers (nn.ModuleList)")
    final_norm = _BodyModule("norm", "the norm before the LM head")

    @property
    def head(self) -> nn.Linear:
        return self.model.lm_head

    def untie_head(self) -> None:
        """Give the LM head its own copy of the embedding matrix, and stop transformers from re-tying it."""
        head, emb = self.head, self.embeddings
        if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        mark_untied(self.model.config)
        # transformers 5 re-ties on `tie_weights()` from this mapping; a sliced model has none.
        self.model._tied_weights_keys = {}
        self.model.all_tied_weights_keys = {}

    # -- running the decoder -----------------------------------------------------------------------------------

    def run_decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the decoder body (embeddings, layers, final norm; no head, no cache) for its hooks' sake."""
        self._body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    # -- one decoder layer -------------------------------------------------------------------------------------

    def parts(self, layer: nn.Module) -> LayerParts:
        """The modules of a dense or sliced decoder layer."""
        decoder_layer: Any = layer  # a transformers decoder layer: its parts are found by name
        attn, mlp = decoder_layer.self_attn, decoder_layer.mlp
        return LayerParts(
            attn_block=attn,
            attn_norm=decoder_layer.input_layernorm,
            attn_in=(attn.q_proj, attn.k_proj, attn.v_proj),
            attn_out=attn.o_proj,
            mlp_block=mlp,
            mlp_norm=decoder_layer.post_attention_layernorm,
            mlp_in=(mlp.gate_proj, mlp.up_proj),
            mlp_out=mlp.down_proj,
        )

    def replace_norms(self, layer: nn.Module, make_norm: Callable[[], nn.Module]) -> None:
        """Put a fresh ``make_norm()`` in place of each of ``layer``'s two residual-stream norms."""
        layer.input_layernorm = make_norm()
        layer.post_attention_layernorm = make_norm()

    def sliced_layer(
        self,
        layer: nn.Module,
        d_in: int,
        d_out: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> SlicedDecoderLayer:
        """A :class:`SlicedDecoderLayer` around ``layer``'s own attention and MLP, with empty shortcuts."""
        parts = self.parts(layer)
        new = SlicedDecoderLayer(
            parts.attn_block, parts.mlp_block, d_in, d_out, self.hidden_size, self.rms_eps, dtype=dtype, device=device
        )
        for attr in self.LAYER_ATTRS:
            if hasattr(layer, attr):
                setattr(new, attr, getattr(layer, attr))
        return new

    def keep_layers(self, keep: Sequence[int]) -> None:
        """Keep only decoder layers ``keep`` (in that order): the config's layer count and per-layer lists and
        each attention's ``layer_idx`` (its KV-cache slot) are renumbered to match."""
        n = self.num_layers
        self._body.layers = nn.ModuleList(self.layers[i] for i in keep)
        cfg = self.model.config
        cfg.num_hidden_layers = len(keep)
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
        for new_idx, layer in enumerate(self.layers):
            attn: Any = self.parts(layer).attn_block  # model code's attention: layer_idx is its own attribute
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = new_idx


#: transformers model classes (by class name, in ``transformers``' own modules) and the adapter for each.
ADAPTERS: dict[str, type[LlamaLikeAdapter]] = {
    "LlamaForCausalLM": LlamaLikeAdapter,
    "MistralForCausalLM": LlamaLikeAdapter,
    "Qwen2ForCausalLM": LlamaLikeAdapter,
    "Qwen3ForCausalLM": LlamaLikeAdapter,
}


def supported_architectures() -> list[str]:
    """Class names of the models that can be sliced."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> LlamaLikeAdapter:
    """The adapter for ``model``'s class, or a ``ValueError`` that lists the supported classes and says why not.

    The class and its bases are looked up in :data:`ADAPTERS` (so a user subclass of ``LlamaForCausalLM`` is
    found); only classes defined by ``transformers`` count, which keeps this module free of a transformers import.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    name = type(model).__name__
    family = name.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    why = UNSUPPORTED_REASONS.get(family, "no adapter is registered for this class")
    raise ValueError(
        f"model: unsupported architecture {name} ({why}). Supported: {', '.join(supported_architectures())}."
    )


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters, shortcut matrices included (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already yields a tied tensor once
