"""Triton kernels with torch fallbacks.

- :func:`masked_gram`: ``H += Σ_t x_tᵀ x_t`` over the unmasked tokens, accumulated in float64 (SliceGPT's PCA).
- :func:`masked_gram_fp32`: the same, fp32 products per chunk summed in float64 (the fast CPU path).
"""

from dynslice.core.kernels.gram import GramConfig, default_config, masked_gram, masked_gram_fp32, triton_available

__all__ = ["GramConfig", "default_config", "masked_gram", "masked_gram_fp32", "triton_available"]
