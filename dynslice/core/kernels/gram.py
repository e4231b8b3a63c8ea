"""Masked Gram (SYRK) accumulation ``H += Σ_t m_t · x_tᵀ x_t`` in float64, with a Triton kernel and a torch fallback.

SliceGPT needs, at each residual-stream position, the Gram matrix of all calibration tokens except padding.
:func:`masked_gram` computes it without copying, zero-filling or upcasting the activation block:

* **Triton** (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): one program per output tile that holds
  an element on or above the diagonal (and per token split); tiles below it are never computed. X tiles are read
  in their own dtype, masked tokens are never read (the mask goes into the load mask, so NaN/inf in padding
  cannot leak), products are summed in fp32 by
  ``tl.dot`` (fp32 inputs with ``input_precision="ieee"``, never TF32) over at most ``chunk_tokens`` tokens, and
  each chunk's fp32 tile is added into the float64 result; the same tile is also written, mirrored, into the
  lower triangle, so the result is exactly symmetric. Each output element is owned by one program: no atomics,
  the result is deterministic.
* **torch** (everything else, and float64 inputs): kept rows are gathered (index_select / advanced indexing,
  never a zero-written copy of X) in chunks of bounded size, upcast per chunk, multiplied in float64.

Tolerance against a float64 reference computed from the same (already rounded) input values, on the data of
``tests/test_kernels.py::test_tolerance_vs_float64``: 2048 tokens (80% kept), D = 64, singular values
4·10^(-3i/D) in a random basis (the eigenvalues span six decades), k = D/2; default launch configuration; the
Triton numbers are from Triton's interpreter on CPU (``bench/gpu_kernels.py`` records the GPU ones). The tests
assert the bounds.

=========  ==========  =================================  ====================================
backend    dtype       rel. error ‖ΔH‖_F / ‖H‖_F          sin of largest top-k subspace angle
=========  ==========  =================================  ====================================
triton     bf16        8.5e-8  (bound 1e-6)               1.7e-5  (bound 3e-4)
triton     fp16        9.1e-8  (bound 1e-6)               1.2e-5  (bound 3e-4)
triton     fp32        1.2e-7  (bound 1e-6)               2.0e-5  (bound 3e-4)
torch      any         < 1e-15 (bound 1e-12)              3e-15   (bound 1e-10)
=========  ==========  =================================  ====================================

bf16/fp16 products are exact in fp32, so the Triton error is the fp32 summation of at most ``chunk_tokens``
products; chunks are summed in float64, so it does not grow with the token count (65536 tokens, D = 32: 3.7e-8).
The angle is set by the eigengap at k (sin θ ≲ ‖ΔH‖ / gap): a plain fp32 ``x.T @ x`` gives 1e-7 / 2e-5 here too.
"""

import os
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch fallback still works
    triton = None
    tl = None

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)
_FALLBACK_CHUNK_BYTES = 1 << 27  # float64 bytes of one gathered chunk in the torch fallback (128 MiB)
_MAX_WORKSPACE_BYTES = 1 << 28  # float64 bytes of the per-split partial sums in the Triton path


@dataclass(frozen=True)
class GramConfig:
    """Launch configuration of the Triton kernel.

    ``block_m`` × ``block_n``: output tile (powers of two, >= 16); ``block_t``: tokens per ``tl.dot`` step (power
    of two, >= 16); ``chunk_tokens``: tokens summed in fp32 before the float64 add (a multiple of ``block_t``);
    ``splits``: token splits run as separate programs (0 = choose from the device's SM count); ``num_warps``,
    ``num_stages``: Triton's launch options.
    """

    block_m: int = 64
    block_n: int = 64
    block_t: int = 32
    chunk_tokens: int = 4096
    splits: int = 0
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_t"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: {v} is not a power of two >= 16")
        if self.chunk_tokens < self.block_t or self.chunk_tokens % self.block_t:
            raise ValueError(
                f"chunk_tokens: {self.chunk_tokens} is not a positive multiple of block_t ({self.block_t})"
            )
        if self.splits < 0:
            raise ValueError(f"splits: {self.splits} is outside splits >= 0")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: {self.num_warps} is not one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} is outside num_stages >= 1")


def default_config(dtype: torch.dtype) -> GramConfig:
    """The Triton launch configuration for ``dtype`` inputs: 16-bit gets larger tiles for the tensor cores.

    Chosen so that the sm_90 build keeps everything in registers (no spills, checked with cuobjdump).
    """
    if dtype in (torch.bfloat16, torch.float16):
        return GramConfig(block_m=128, block_n=64, block_t=64, num_warps=8, num_stages=3)
    return GramConfig(block_m=64, block_n=64, block_t=32, num_warps=8, num_stages=3)


def triton_available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def masked_gram(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
    config: GramConfig | None = None,
) -> torch.Tensor:
    """Add ``Σ_t x_tᵀ x_t`` over the kept tokens of ``x`` to ``out`` (float64, D×D) and return it.

    ``x``: (tokens, D) or (batch, seq, D), bf16/fp16/fp32 (float64 with the torch backend). ``mask``: bool or 0/1
    integer tensor of shape ``x.shape[:-1]``; True keeps a token (None keeps all); masked tokens are never read.
    ``out``: optional float64 (D, D) accumulator on x's device, added to in place (a new one when None).
    ``backend``: ``"auto"`` uses Triton for CUDA tensors when Triton is importable and the dtype allows,
    else torch; ``"triton"`` forces the kernel (on CPU tensors it needs ``TRITON_INTERPRET=1``, Triton's
    interpreter); ``"torch"`` forces the fallback. ``config``: Triton launch configuration (default per dtype).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {_BACKENDS}")
    _check_x(x)
    keep = _normalise_mask(mask, x)
    _check_out(out, x)
    if backend == "auto":
        use_triton = x.is_cuda and triton is not None and x.dtype in _TRITON_DTYPES
    else:
        use_triton = backend == "triton"
    if not use_triton:
        return _gram_torch(x, keep, out)
    if triton is None:
        raise ValueError("backend: 'triton' needs the triton package; install it or use backend='torch'")
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"x: dtype {x.dtype} is not supported by backend='triton' (allowed: bf16, fp16, fp32); use backend='torch'"
        )
    if not x.is_cuda and not _interpret_mode():
        raise ValueError(
            "backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter); "
            "use CUDA tensors or backend='torch'"
        )
    return _gram_triton(x, keep, out, config or default_config(x.dtype))


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x: {x.dim()} dimensions is outside 2 <= x.dim() <= 3 ((tokens, D) or (batch, seq, D))")
    if x.shape[-1] < 1:
        raise ValueError("x: hidden size D = 0 is outside D >= 1")
    if x.dtype not in _TORCH_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not one of bf16, fp16, fp32, fp64")


def _normalise_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The mask as a flat bool tensor over tokens (row-major over x's leading dims), or None for keep-all."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask: shape {tuple(mask.shape)} is not x's leading shape {tuple(x.shape[:-1])}")
    if mask.device != x.device:
        raise ValueError(f"mask: on {mask.device}, x is on {x.device}")
    if mask.dtype == torch.bool:
        return mask.reshape(-1)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"mask: dtype {mask.dtype} is not bool or integer")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask: integer values must lie in {0, 1}")
    return mask.reshape(-1).bool()


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> None:
    d = x.shape[-1]
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float64 or tuple(out.shape) != (d, d) or out.device != x.device:
        raise ValueError(f"out: {out.dtype} {tuple(out.shape)} on {out.device} is not float64 ({d}, {d}) on {x.device}")


# ---------------------------------------------------------------------------------------------------- torch path


def _flattens(x: torch.Tensor) -> bool:
    """Whether x's leading dims merge into one token axis without a copy."""
    return x.dim() == 2 or x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _gram_torch(
    x: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor | None, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """Float64 Gram of the kept rows, gathered ``rows_per_chunk`` at a time (default: 128 MiB of float64);
    exactly symmetric; added into ``out``."""
    d = x.shape[-1]
    seq = x.shape[-2]
    flat = x.view(-1, d) if _flattens(x) else None
    rows_per_chunk = rows_per_chunk or max(1, _FALLBACK_CHUNK_BYTES // (8 * d))
    idx = None if keep is None else keep.nonzero().squeeze(1)
    n_rows = x.shape[:-1].numel() if idx is None else idx.numel()
    h = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        if flat is not None and idx is None:
            rows = flat[start:stop]
        else:
            tok = torch.arange(start, stop, device=x.device) if idx is None else idx[start:stop]
            rows = flat.index_select(0, tok) if flat is not None else x[tok // seq, tok % seq]
        rows = rows.to(torch.float64)
        h.addmm_(rows.T, rows)
    h = h.add_(h.T.clone()).mul_(0.5)
    return h if out is None else out.add_(h)


def masked_gram_fp32(
    x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None, *, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Like :func:`masked_gram` with the torch backend, but each chunk of ``chunk_tokens`` kept tokens is multiplied
    in fp32 and only the chunk sums are added in float64 (what the Triton kernel does on the GPU).

    On a CPU this is several times faster than the float64 path; the error is that of an fp32 sum of at most
    ``chunk_tokens`` products (about 1e-7 relative), and it does not grow with the number of tokens.
    """
    _check_x(x)
    if x.dtype == torch.float64:
        return _gram_torch(x, _normalise_mask(mask, x), out)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: {chunk_tokens!r} is outside chunk_tokens >= 1")
    keep = _normalise_mask(mask, x)
    _check_out(out, x)
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if keep is not None and not bool(keep.all()):
        flat = flat.index_select(0, keep.nonzero().squeeze(1))
    h = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        _add_upper_gram(h, flat[start : start + chunk_tokens].to(torch.float32))
    h = h.add_(h.T.clone()).mul_(0.5)
    return h if out is None else out.add_(h)


#: Row panels of the Gram matrix computed by :func:`_add_upper_gram` (torch has no SYRK): with two, the block
#: below the diagonal is mirrored instead of multiplied, a quarter fewer products (measured on a 4096 × 576 fp32
#: chunk, one thread: 35 → 23 ms; more panels gain little as the products get thinner).
GRAM_PANELS = 2


def _add_upper_gram(h: torch.Tensor, rows: torch.Tensor, panels: int = GRAM_PANELS) -> None:
    """``h += rowsᵀ·rows`` (fp32 products added into float64 ``h``), computing each block on or above the diagonal
    of a ``panels`` × ``panels`` split once and mirroring the ones above it."""
    d = rows.shape[1]
    edges = [d * k // panels for k in range(panels + 1)]
    for a, b in zip(edges, edges[1:]):
        if a == b:
            continue
        block = rows[:, a:b].T @ rows[:, a:]  # (b - a) × (d - a): the diagonal block and everything right of it
        h[a:b, a:].add_(block)
        if b < d:
            h[b:, a:b].add_(block[:, b - a :].T)


# --------------------------------------------------------------------------------------------------- Triton path

if triton is not None:

    def _masked_gram_tiles(
        x_ptr,
        keep_ptr,
        out_ptr,
        pairs_ptr,
        n_tokens,
        seq_len,
        d,
        stride_b,
        stride_s,
        stride_d,
        stride_split,
        stride_row,
        tokens_per_split,
        HAS_MASK: tl.constexpr,
        FLAT: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        IEEE: tl.constexpr,
        WIDEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        CHUNK_BLOCKS: tl.constexpr,
    ):
        """One (tile pair, token split) program: out[split] tile (bi, bj) and its mirror (bj, bi).

        Uses tl builtins only (no @jit helpers such as tl.zeros or tl.cdiv), so the interpreted variant built by
        :func:`_kernel` works even when triton was imported before ``TRITON_INTERPRET`` was set.
        """
        pair = tl.program_id(0)
        split = tl.program_id(1)
        bi = tl.load(pairs_ptr + 2 * pair)
        bj = tl.load(pairs_ptr + 2 * pair + 1)
        rows = bi * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = bj * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < d
        col_ok = cols < d
        base = out_ptr + split.to(tl.int64) * stride_split

        t_begin = split * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
        n_blocks = (tl.maximum(t_end - t_begin, 0) + BLOCK_T - 1) // BLOCK_T
        n_chunks = tl.maximum((n_blocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS, 1)
        dt = tl.arange(0, BLOCK_T)
        for c in range(0, n_chunks):
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for blk in range(c * CHUNK_BLOCKS, tl.minimum((c + 1) * CHUNK_BLOCKS, n_blocks)):
                t = t_begin + blk * BLOCK_T + dt
                t_ok = t < t_end
                if HAS_MASK:
                    t_ok = t_ok & (tl.load(keep_ptr + t, mask=t_ok, other=0) != 0)
                t64 = t.to(tl.int64)
                if FLAT:
                    t_off = t64 * stride_s
                else:
                    t_off = (t64 // seq_len) * stride_b + (t64 % seq_len) * stride_s
                a = tl.load(
                    x_ptr + rows[:, None] * stride_d + t_off[None, :], mask=row_ok[:, None] & t_ok[None, :], other=0.0
                )
                b = tl.load(
                    x_ptr + t_off[:, None] + cols[None, :] * stride_d, mask=t_ok[:, None] & col_ok[None, :], other=0.0
                )
                if WIDEN:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            # Element (row, col) of the tile goes to out[row, col] when row <= col and, mirrored, to out[col, row]
            # when row < col: every output element is written by exactly one program, always by the same thread.
            # The first chunk of a non-accumulating launch writes without reading (dest may hold garbage).
            read = tl.full((1, BLOCK_N), c, tl.int32) > 0
            if ACCUMULATE:
                read = read | True
            tile_ok = row_ok[:, None] & col_ok[None, :]
            up_ok = tile_ok & (rows[:, None] <= cols[None, :])
            up_ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
            tl.store(up_ptrs, tl.load(up_ptrs, mask=up_ok & read, other=0.0) + acc.to(tl.float64), mask=up_ok)
            lo_ok = tile_ok & (rows[:, None] < cols[None, :])
            lo_ptrs = base + cols[None, :].to(tl.int64) * stride_row + rows[:, None]
            tl.store(lo_ptrs, tl.load(lo_ptrs, mask=lo_ok & read, other=0.0) + acc.to(tl.float64), mask=lo_ok)


@cache
def _kernel(interpret: bool):
    """The jitted kernel; built on first use so that ``TRITON_INTERPRET`` is read at call time (the key)."""
    del interpret  # only the cache key: triton.jit itself reads TRITON_INTERPRET
    return triton.jit(_masked_gram_tiles)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_pairs(d: int, cfg: GramConfig, device: torch.device) -> torch.Tensor:
    """(i, j) tile indices of the tiles holding some element with row <= col, flattened to int32 [i0, j0, ...]."""
    i = torch.arange(_cdiv(d, cfg.block_m), device=device)[:, None]
    j = torch.arange(_cdiv(d, cfg.block_n), device=device)[None, :]
    return torch.nonzero(i * cfg.block_m <= j * cfg.block_n + cfg.block_n - 1).to(torch.int32).reshape(-1)


def _split_tokens(n_pairs: int, n_tokens: int, d: int, cfg: GramConfig, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split): enough programs to fill the device, at most one split per chunk of tokens,
    the float64 workspace bounded, every split non-empty."""
    if cfg.splits:
        want = cfg.splits
    elif device.type == "cuda":
        want = _cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, n_pairs)
    else:
        want = 1
    by_chunks = max(1, _cdiv(n_tokens, cfg.chunk_tokens))
    by_memory = max(1, _MAX_WORKSPACE_BYTES // (8 * d * d))
    splits = max(1, min(want, by_chunks, by_memory))
    per_split = max(1, _cdiv(_cdiv(n_tokens, splits), cfg.block_t)) * cfg.block_t
    return max(1, _cdiv(n_tokens, per_split)), per_split


def _launch(
    x: torch.Tensor,
    keep: torch.Tensor | None,
    dest: torch.Tensor,
    pairs: torch.Tensor,
    tokens_per_split: int,
    cfg: GramConfig,
    accumulate: bool,
) -> object:
    """Run the kernel: dest (D, D) for one split, else (splits, D, D); last dim contiguous.

    ``accumulate``: add into dest; otherwise the kernel overwrites every element of dest (garbage allowed).
    Returns Triton's launch result (the compiled kernel on GPU: ``n_regs``, ``n_spills``, ``metadata``).
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    n_batch, seq_len, d = x3.shape
    stride_b, stride_s, stride_d = x3.stride()
    splits = 1 if dest.dim() == 2 else dest.shape[0]
    stride_split = 0 if dest.dim() == 2 else dest.stride(0)
    keep_u8 = keep.to(torch.uint8) if keep is not None else None
    interpret = _interpret_mode()
    # Triton 3.9's interpreter multiplies the raw uint16 bits of bf16 tiles in tl.dot, so there bf16 tiles are
    # widened to fp32 first; exact, since bf16 products are exact in fp32 anyway.
    widen = interpret and x.dtype == torch.bfloat16
    return _kernel(interpret)[(pairs.numel() // 2, splits)](
        x3,
        keep_u8 if keep_u8 is not None else x3,
        dest,
        pairs,
        n_batch * seq_len,
        seq_len,
        d,
        stride_b,
        stride_s,
        stride_d,
        stride_split,
        dest.stride(-2),
        tokens_per_split,
        HAS_MASK=keep_u8 is not None,
        FLAT=_flattens(x3),
        ACCUMULATE=accumulate,
        IEEE=x.dtype == torch.float32 or widen,
        WIDEN=widen,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t,
        CHUNK_BLOCKS=cfg.chunk_tokens // cfg.block_t,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _gram_triton(x: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor | None, cfg: GramConfig) -> torch.Tensor:
    """Kernel result added into ``out`` (written straight into it when one split suffices)."""
    d = x.shape[-1]
    pairs = _tile_pairs(d, cfg, x.device)
    splits, per_split = _split_tokens(pairs.numel() // 2, x.shape[:-1].numel(), d, cfg, x.device)
    if splits == 1 and (out is None or out.stride(1) == 1):
        dest = torch.empty(d, d, dtype=torch.float64, device=x.device) if out is None else out
        _launch(x, keep, dest, pairs, per_split, cfg, accumulate=out is not None)
        return dest
    dest = torch.empty((splits, d, d) if splits > 1 else (d, d), dtype=torch.float64, device=x.device)
    _launch(x, keep, dest, pairs, per_split, cfg, accumulate=False)
    h = dest.sum(0) if splits > 1 else dest
    return h if out is None else out.add_(h)
