"""Architecture adapters: where a decoder's embeddings, norms and linears live.

The slicing engine, the LR score and layer deletion reach a model only through its adapter, so a new
Llama-like architecture is one entry in :data:`ADAPTERS`. Adapters are chosen by the model's class, never by
its name or path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Architectures known to break rotation invariance, with the reason given to the user.
UNSUPPORTED_REASONS: dict[str, str] = {
    "Gemma": "Gemma-2/3 put extra RMSNorms around each sublayer (pre- and post-norm), and the post-sublayer "
    "norm sits on the residual branch, so an orthogonal rotation of the residual stream no longer commutes "
    "with the block",
    "Gemma2": "Gemma-2 puts post-attention and post-MLP norms on the residual branch, breaking rotation invariance",
    "Gemma3": "Gemma-3 puts post-attention and post-MLP norms on the residual branch, breaking rotation invariance",
    "Phi3": "Phi-3 fuses q/k/v and gate/up into single linears; no adapter is written for it yet",
    "GPT2": "GPT-2 uses LayerNorm with bias and Conv1D linears; no adapter is written for it yet",
}


@dataclass(frozen=True)
class LayerParts:
    """The pieces of one pre-norm decoder layer that rotate-and-slice touches."""

    attn_norm: nn.Module
    attn_in: tuple[nn.Linear, ...]
    attn_out: nn.Linear
    mlp_norm: nn.Module
    mlp_in: tuple[nn.Linear, ...]
    mlp_out: nn.Linear


class LlamaLikeAdapter:
    """Adapter for pre-RMSNorm decoders with ``q/k/v/o_proj`` attention and ``gate/up/down_proj`` SwiGLU MLP.

    Covers Llama (Llama-2/3, SmolLM2), Mistral and Qwen2 (Qwen2's q/k/v biases sit on the output side of
    input-rotated linears and are left as they are).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

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
    def embeddings(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @final_norm.setter
    def final_norm(self, module: nn.Module) -> None:
        self.model.model.norm = module

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def rms_eps(self) -> float:
        return float(getattr(self.model.config, "rms_norm_eps", 1e-6))

    def parts(self, layer: nn.Module) -> LayerParts:
        """The norms and linears of a dense or sliced decoder layer."""
        attn, mlp = layer.self_attn, layer.mlp
        return LayerParts(
            attn_norm=layer.input_layernorm,
            attn_in=(attn.q_proj, attn.k_proj, attn.v_proj),
            attn_out=attn.o_proj,
            mlp_norm=layer.post_attention_layernorm,
            mlp_in=(mlp.gate_proj, mlp.up_proj),
            mlp_out=mlp.down_proj,
        )


#: transformers model classes (by class name, in ``transformers``' own modules) and the adapter for each.
ADAPTERS: dict[str, type[LlamaLikeAdapter]] = {
    "LlamaForCausalLM": LlamaLikeAdapter,
    "MistralForCausalLM": LlamaLikeAdapter,
    "Qwen2ForCausalLM": LlamaLikeAdapter,
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
