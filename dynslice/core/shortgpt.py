"""ShortGPT layer deletion (Men et al., 2024): drop whole decoder layers with the lowest Block Influence.

Block Influence of layer ``i`` is ``BI_i = 1 - mean cos(h_in, h_out)`` over tokens (``metric="bi"`` of
:func:`dynslice.core.lr.layer_redundancy`). A layer that barely turns the residual stream has a low BI and is deleted
first. To compare with slicing at equal size, layers are deleted in that order until the dense parameter count
is at or below a target: whole layers cannot match a count exactly, so the deleted model is never larger than
its target (see :func:`layers_to_delete`).

Core module: torch and the core only; no data, no files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from torch import nn

from dynslice.core.adapters import get_adapter
from dynslice.core.checks import check_int
from dynslice.core.params import ArchDims, dense_params


def deletion_order(bi: Sequence[float]) -> list[int]:
    """Layer indices from lowest to highest BI (ties: the lower index first)."""
    arr = np.asarray(bi, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"bi: expected a non-empty 1-D sequence of finite scores, got {list(np.ravel(arr))[:8]}")
    return [int(i) for i in np.argsort(arr, kind="stable")]


def params_after_deletion(dims: ArchDims, n_deleted: int) -> int:
    """Dense parameter count with ``n_deleted`` decoder layers removed (all layers have the same shape)."""
    check_int("n_deleted", n_deleted, 0, dims.layers - 1, allowed=f"0 <= n_deleted < {dims.layers} (the layer count)")
    return dense_params(dataclasses.replace(dims, layers=dims.layers - n_deleted))


def layers_to_delete(bi: Sequence[float], dims: ArchDims, target_params: int) -> list[int]:
    """The lowest-BI layers to delete so that the dense count is ``<= target_params`` (fewest such layers).

    Raises ``ValueError`` if even one remaining layer is above the target.
    """
    order = deletion_order(bi)
    if len(order) != dims.layers:
        raise ValueError(f"bi: has {len(order)} scores but the model has {dims.layers} layers")
    for k in range(dims.layers):
        if params_after_deletion(dims, k) <= target_params:
            return sorted(order[:k])
    raise ValueError(
        f"target_params: {target_params} is below a one-layer model "
        f"({params_after_deletion(dims, dims.layers - 1)}); no deletion reaches it"
    )


def delete_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Remove decoder layers ``indices`` from ``model`` in place and return it.

    The config's layer count (and per-layer lists such as ``layer_types``) and each attention's ``layer_idx``
    (its KV-cache slot) are renumbered, so the shortened model runs with and without a cache.
    """
    adapter = get_adapter(model)
    n = adapter.num_layers
    drop = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n:
            raise ValueError(f"indices: {i!r} is not a layer index in [0, {n - 1}]")
        drop.add(int(i))
    if len(drop) >= n:
        raise ValueError(f"indices: deleting {len(drop)} of {n} layers leaves none; keep at least one")
    adapter.keep_layers([i for i in range(n) if i not in drop])
    return model
