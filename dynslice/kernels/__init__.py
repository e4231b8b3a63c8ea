"""Triton kernels with torch fallbacks.

- :func:`masked_gram`: ``H += Σ_t x_tᵀ x_t`` over the unmasked tokens, accumulated in float64 (SliceGPT's PCA).
"""

from dynslice.kernels.gram import GramConfig, default_config, masked_gram, triton_available

__all__ = ["GramConfig", "default_config", "masked_gram", "triton_available"]
