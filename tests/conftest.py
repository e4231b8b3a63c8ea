"""Shared fixtures: tiny random models of every supported architecture, and the embedded SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from dynslice.store.paths import configure_hf_cache

configure_hf_cache()

TINY_ARCHS = ("llama", "mistral", "qwen2")


def make_tiny_model(
    arch: str = "llama", *, tied: bool = True, vocab: int = 96, seed: int = 0, hidden: int = 48, layers: int = 3
):
    """A randomly initialised, tiny causal LM of ``arch`` (llama, mistral, qwen2 or qwen3), built offline, in fp32.

    Norm weights are randomised too, so that folding them is actually exercised. The qwen3 model's heads are
    16 wide, so its attention width (96) differs from the hidden size, as in real Qwen3 models.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    extra = {"mistral": {"sliding_window": 4096}, "qwen3": {"head_dim": 16}}.get(arch, {})
    cfg = cfg_cls(**common, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:  # biases (qwen2)
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model


def make_batch(
    vocab: int = 96, n: int = 6, seqlen: int = 24, seed: int = 1, pad_id: int = 0, padded: bool = True
) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows (attention_mask marks real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seqlen), generator=g)
    mask = torch.ones(n, seqlen, dtype=torch.long)
    if padded:
        for row in range(1, n, 2):
            keep = int(torch.randint(seqlen // 3, seqlen, (1,), generator=g))
            mask[row, keep:] = 0
            ids[row, keep:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smol():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M, fp32 on CPU. Loaded once per session."""
    from dynslice.store.models import load

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer alone."""
    from dynslice.store.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
