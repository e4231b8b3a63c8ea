"""The algorithm core: what a user needs to slice a model held in memory.

- :mod:`~dynslice.core.adapters`: where a decoder's embeddings, norms and linears live (one entry per architecture);
- :mod:`~dynslice.core.layers`: the sliced decoder layer (shortcut matrices on the residual stream);
- :mod:`~dynslice.core.slicing`: norm folding, PCA of the calibration signals, rotate-and-slice;
- :mod:`~dynslice.core.lr`: the Layer Redundancy score (and ShortGPT's BI, angular distance);
- :mod:`~dynslice.core.allocate`: SP/SB (and a parameter budget) to per-layer widths;
- :mod:`~dynslice.core.params`: exact parameter counts from widths;
- :mod:`~dynslice.core.shortgpt`: whole-layer deletion, the ShortGPT baseline;
- :mod:`~dynslice.core.kernels`: the masked Gram kernel (Triton on CUDA, torch elsewhere);
- :mod:`~dynslice.core.search`: the budgeted search for the best slicing base SB (model-free).

The core imports the standard library, torch, numpy and tqdm, and nothing else: not transformers, not the
experiment side of dynslice (loading, data, evaluation, configs, the CLI). ``tests/test_layering.py`` enforces it.
"""
