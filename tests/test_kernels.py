"""masked_gram: Triton kernel (native on CUDA, Triton's interpreter on CPU) and torch fallback vs float64 references.

On CPU the Triton tests set ``TRITON_INTERPRET=1`` for their own duration (monkeypatch). That is enough even when
another test module imported triton first: the kernel uses tl builtins only and is jitted at call time, keyed by
the variable (see ``dynslice.core.kernels.gram._kernel``); ``test_interpreter_after_triton_import`` checks this in a
fresh process. Exact checks use small-integer data, whose Gram matrix every backend and dtype computes exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dynslice.core.kernels import GramConfig, default_config, masked_gram, triton_available
from dynslice.core.kernels import gram as gram_mod

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Small tiles so that the interpreter sees many tile pairs, ragged edges, several chunks per program.
SMALL = GramConfig(block_m=32, block_n=16, block_t=16, chunk_tokens=32)

# Documented tolerances (see dynslice/core/kernels/gram.py): decaying-spectrum data, T=2048, D=64, k=D/2.
REL_BOUND = {"triton": 1e-6, "torch": 1e-12}
SIN_BOUND = {"triton": 3e-4, "torch": 1e-10}

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch) -> str:
    """Each backend; for Triton on CPU, the interpreter switched on for this test only."""
    if request.param == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if not CUDA:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture
def interp(monkeypatch) -> None:
    """Triton usable on DEVICE: native on CUDA, the interpreter on CPU."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def int_data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Integers in [-3, 3]: every product and partial sum here is exact in fp32 and float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(dtype).to(DEVICE)


def some_mask(shape: tuple[int, ...], seed: int = 1, p: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).to(DEVICE)


def reference(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Float64 Gram of the kept tokens, as a sum of per-token outer products (no shared code with the backends)."""
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    return torch.einsum("ti,tj->ij", rows, rows)


def decaying(t: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with singular values 4·10^(-3i/d) along a random orthogonal basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = 4 * 10.0 ** (-3.0 * torch.arange(d, dtype=torch.float64) / d)
    return ((torch.randn(t, d, generator=g, dtype=torch.float64) * s) @ q.T).to(dtype).to(DEVICE)


def sin_top_k(h: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """Sine of the largest principal angle between the top-k eigenvector subspaces of h and ref."""
    u = torch.linalg.eigh(h.cpu())[1][:, -k:]
    v = torch.linalg.eigh(ref.cpu())[1][:, -k:]
    return torch.linalg.matrix_norm(v - u @ (u.T @ v), ord=2).item()


# ------------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("d", [1, 17, 70, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_awkward_shapes(backend, d, dtype):
    x = int_data((45, d), dtype)  # 45 tokens: not a multiple of any block
    mask = some_mask((45,))
    cfg = SMALL if d != 70 else default_config(dtype)
    h = masked_gram(x, mask, backend=backend, config=cfg)
    assert h.dtype == torch.float64 and h.shape == (d, d) and h.device == x.device
    assert torch.equal(h, reference(x, mask))


@pytest.mark.parametrize("kind", ["all", "none", "some", "int01"])
def test_masks(backend, kind):
    x = int_data((3, 21, 24), torch.bfloat16, seed=2)
    mask = {
        "all": torch.ones(3, 21, dtype=torch.bool, device=DEVICE),
        "none": torch.zeros(3, 21, dtype=torch.bool, device=DEVICE),
        "some": some_mask((3, 21)),
        "int01": some_mask((3, 21)).to(torch.int64),
    }[kind]
    h = masked_gram(x, mask, backend=backend, config=SMALL)
    ref = reference(x, mask)
    assert torch.equal(h, ref)
    if kind == "none":
        assert not h.any()
    if kind == "all":
        assert torch.equal(h, masked_gram(x, None, backend=backend, config=SMALL))


def test_zero_tokens(backend):
    x = torch.zeros(2, 0, 9, dtype=torch.float16, device=DEVICE)
    assert torch.equal(masked_gram(x, backend=backend), torch.zeros(9, 9, dtype=torch.float64, device=DEVICE))
    out = torch.full((9, 9), 2.0, dtype=torch.float64, device=DEVICE)
    masked_gram(x, torch.zeros(2, 0, dtype=torch.bool, device=DEVICE), out=out, backend=backend)
    assert (out == 2.0).all()


def test_masked_tokens_are_never_read(backend):
    """NaN/inf in padding must not reach the result (no 0·NaN)."""
    x = int_data((2, 19, 20), torch.float32, seed=3)
    mask = some_mask((2, 19), seed=4)
    ref = reference(x, mask)
    x[~mask] = torch.tensor([float("nan"), float("inf")], device=DEVICE).repeat(10)[:20]
    assert torch.equal(masked_gram(x, mask, backend=backend, config=SMALL), ref)


def test_non_contiguous_3d(backend):
    """(batch, seq, D) views whose leading dims do not merge: the strided (non-flat) addressing."""
    base = int_data((23, 3, 40), torch.float16, seed=5)  # (seq, batch, D)
    x = base.transpose(0, 1)  # (batch, seq, D), stride_b != seq * stride_s
    assert not gram_mod._flattens(x)
    mask = some_mask((3, 23), seed=6)
    assert torch.equal(masked_gram(x, mask, backend=backend, config=SMALL), reference(x, mask))


def test_column_strided_2d(backend):
    x = int_data((37, 60), torch.float32, seed=7)[:, ::2]  # stride_d = 2
    assert torch.equal(masked_gram(x, backend=backend, config=SMALL), reference(x, None))


def test_out_sentinel_accumulates_exactly(backend):
    """A pre-filled (symmetric) out must become exactly out + XᵀX everywhere: nothing skipped or added twice."""
    d = 37
    x = int_data((50, d), torch.bfloat16, seed=8)
    mask = some_mask((50,), seed=9)
    i = torch.arange(d, device=DEVICE, dtype=torch.float64)
    known = 0.25 + i[:, None] * 1000 + i[None, :] * 1000  # distinct-ish, symmetric, exactly representable
    out = known.clone()
    res = masked_gram(x, mask, out=out, backend=backend, config=SMALL)
    assert res is out
    assert torch.equal(out, known + reference(x, mask))


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_out_non_contiguous(backend, layout):
    d = 33
    x = int_data((40, d), torch.float32, seed=10)
    big = torch.full((d, d + 7), 5.0, dtype=torch.float64, device=DEVICE)
    out = (
        big[:, 3 : 3 + d] if layout == "row_strided" else torch.full((d, d), 5.0, dtype=torch.float64, device=DEVICE).T
    )
    masked_gram(x, out=out, backend=backend, config=SMALL)
    assert torch.equal(out, 5.0 + reference(x, None))
    if layout == "row_strided":  # the columns around the view are untouched
        assert (big[:, :3] == 5.0).all() and (big[:, 3 + d :] == 5.0).all()


def test_accumulates_across_calls(backend):
    x1 = int_data((2, 30, 26), torch.float16, seed=11)
    x2 = int_data((17, 26), torch.float16, seed=12)
    m1 = some_mask((2, 30), seed=13)
    h = masked_gram(x1, m1, backend=backend, config=SMALL)
    masked_gram(x2, out=h, backend=backend, config=SMALL)
    assert torch.equal(h, reference(x1, m1) + reference(x2, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_bitwise(backend, dtype):
    x = decaying(300, 45, dtype, seed=14)
    h = masked_gram(x, some_mask((300,), seed=15), backend=backend, config=SMALL)
    assert torch.equal(h, h.T)


# ------------------------------------------------------------------------------------------- Triton specifics


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_writes_every_element(interp, splits):
    """Non-accumulating launch into NaN-poisoned destinations: the kernel alone must write each element."""
    d, t = 41, 90
    x = int_data((t, d), torch.bfloat16, seed=16)
    mask = some_mask((t,), seed=17)
    cfg = GramConfig(block_m=16, block_n=32, block_t=16, chunk_tokens=32, splits=splits)
    pairs = gram_mod._tile_pairs(d, cfg, x.device)
    n_splits, per_split = gram_mod._split_tokens(pairs.numel() // 2, t, d, cfg, x.device)
    assert n_splits == splits
    shape = (d, d) if splits == 1 else (splits, d, d)
    dest = torch.full(shape, float("nan"), dtype=torch.float64, device=DEVICE)
    gram_mod._launch(x, mask, dest, pairs, per_split, cfg, accumulate=False)
    assert not dest.isnan().any()
    parts = dest.unsqueeze(0) if splits == 1 else dest
    for s in range(splits):  # each split holds the Gram of its own token range
        lo, hi = s * per_split, min((s + 1) * per_split, t)
        assert torch.equal(parts[s], reference(x[lo:hi], mask[lo:hi]))


def test_splits_and_chunks_agree(interp):
    x = int_data((3, 50, 30), torch.float32, seed=18)
    mask = some_mask((3, 50), seed=19)
    ref = reference(x, mask)
    for cfg in (
        GramConfig(block_m=16, block_n=16, block_t=16, chunk_tokens=16, splits=4),
        GramConfig(block_m=64, block_n=16, block_t=32, chunk_tokens=64, splits=2),
        SMALL,
    ):
        assert torch.equal(masked_gram(x, mask, backend="triton", config=cfg), ref)


def test_tile_pairs_cover_upper_triangle_once():
    for d, cfg in ((130, SMALL), (70, default_config(torch.bfloat16)), (64, GramConfig(block_m=16, block_n=64))):
        pairs = gram_mod._tile_pairs(d, cfg, torch.device("cpu")).reshape(-1, 2).tolist()
        hits = torch.zeros(d, d, dtype=torch.int64)
        for i, j in pairs:
            r = torch.arange(i * cfg.block_m, min((i + 1) * cfg.block_m, d))
            c = torch.arange(j * cfg.block_n, min((j + 1) * cfg.block_n, d))
            up = (r[:, None] <= c[None, :]).long()
            hits[r[:, None], c[None, :]] += up  # stored as is
            hits[c[None, :], r[:, None]] += (r[:, None] < c[None, :]).long()  # mirrored
        assert torch.equal(hits, torch.ones(d, d, dtype=torch.int64))


def test_interpreter_after_triton_import():
    """Triton imported before TRITON_INTERPRET is set (as another test module might) still interprets."""
    if not triton_available():
        pytest.skip("triton is not installed")
    code = (
        "import os, torch, triton\n"
        "from dynslice.core.kernels import masked_gram\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randint(-3, 4, (40, 20)).float()\n"
        "assert torch.equal(masked_gram(x, backend='triton'), x.double().T @ x.double())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiles_for_sm90(dtype, monkeypatch):
    """The default configurations build to a cubin for Hopper (no GPU needed): both addressing modes, both
    write modes."""
    if not triton_available():
        pytest.skip("triton is not installed")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = default_config(dtype)
    fn = triton.jit(gram_mod._masked_gram_tiles)
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(x_ptr=ptr, keep_ptr="*u8", out_ptr="*fp64", pairs_ptr="*i32")
    for flat, accumulate in ((True, False), (False, True)):
        const = dict(
            HAS_MASK=True,
            FLAT=flat,
            ACCUMULATE=accumulate,
            IEEE=dtype == torch.float32,
            WIDEN=False,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_T=cfg.block_t,
            CHUNK_BLOCKS=cfg.chunk_tokens // cfg.block_t,
        )
        sig.update({k: "constexpr" for k in const})
        try:
            k = triton.compile(
                ASTSource(fn, sig, const),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
        except RuntimeError as e:  # no CUDA toolchain bundled with this triton build
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        assert len(k.asm["cubin"]) > 0
        if dtype != torch.float32:  # 16-bit tiles go through Hopper's tensor cores
            assert "wgmma" in k.asm["ptx"]


# ------------------------------------------------------------------------------------------------- tolerances


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_vs_float64(backend, dtype):
    """The documented bounds: ‖ΔH‖_F/‖H‖_F and the top-D/2 subspace angle, default launch configuration."""
    t, d = 2048, 64
    x = decaying(t, d, dtype, seed=20)
    mask = some_mask((t,), seed=21, p=0.8)
    ref = reference(x, mask)
    h = masked_gram(x, mask, backend=backend)
    rel = ((h - ref).norm() / ref.norm()).item()
    assert rel <= REL_BOUND[backend]
    assert sin_top_k(h, ref, d // 2) <= SIN_BOUND[backend]
    if backend == "triton" and dtype == torch.float32:  # genuinely fp32 sums, not float64 ones
        assert rel > 0


def test_torch_fallback_chunks_and_float64():
    x = decaying(3, 30, torch.float64, seed=22).reshape(3, 1, 30).expand(3, 5, 30)  # non-flat, float64
    mask = some_mask((3, 5), seed=23)
    ref = reference(x, mask)
    for rows in (1, 4, 1000):
        h = gram_mod._gram_torch(x, mask.reshape(-1), None, rows_per_chunk=rows)
        torch.testing.assert_close(h, ref, rtol=1e-13, atol=1e-13)
        assert torch.equal(h, h.T)


def test_auto_dispatch():
    x = int_data((20, 12), torch.float32, seed=24)
    h = masked_gram(x)  # auto: Triton on CUDA, torch on CPU
    assert torch.equal(h, reference(x, None))
    if not CUDA:
        assert torch.equal(h, gram_mod._gram_torch(x, None, None))
    assert torch.equal(masked_gram(x.double()), reference(x, None))  # float64: torch even on CUDA


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input(monkeypatch):
    x = torch.zeros(5, 4, device=DEVICE)
    cases = [
        (dict(x=torch.zeros(5, device=DEVICE)), "x:"),
        (dict(x=torch.zeros(2, 2, 2, 2, device=DEVICE)), "x:"),
        (dict(x=torch.zeros(5, 0, device=DEVICE)), "x:"),
        (dict(x=torch.zeros(5, 4, dtype=torch.int32, device=DEVICE)), "x:"),
        (dict(x=x, mask=torch.ones(4, dtype=torch.bool, device=DEVICE)), "mask:"),
        (dict(x=x, mask=torch.ones(5, device=DEVICE)), "mask:"),
        (dict(x=x, mask=torch.full((5,), 2, device=DEVICE)), "mask:"),
        (dict(x=x, out=torch.zeros(4, 4, device=DEVICE)), "out:"),
        (dict(x=x, out=torch.zeros(4, 5, dtype=torch.float64, device=DEVICE)), "out:"),
        (dict(x=x, backend="cuda"), "backend:"),
    ]
    if triton_available():
        cases.append((dict(x=x.double(), backend="triton"), "x:"))
    for kwargs, prefix in cases:
        with pytest.raises(ValueError, match=f"^{prefix}"):
            masked_gram(**kwargs)
    if not CUDA and triton_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="^backend: 'triton' on CPU"):
            masked_gram(x, backend="triton")
    for kwargs, prefix in (
        (dict(block_m=24), "block_m:"),
        (dict(block_t=8), "block_t:"),
        (dict(chunk_tokens=40), "chunk_tokens:"),
        (dict(splits=-1), "splits:"),
        (dict(num_warps=3), "num_warps:"),
        (dict(num_stages=0), "num_stages:"),
    ):
        with pytest.raises(ValueError, match=f"^{prefix}"):
            GramConfig(**kwargs)


def test_docstring_states_the_bounds():
    """The module docstring's table and these tests must not drift apart."""
    for bound in (*REL_BOUND.values(), *SIN_BOUND.values()):
        assert f"bound {bound:.0e}".replace("e-0", "e-") in gram_mod.__doc__


@pytest.mark.parametrize("d", [1, 5, 48, 97])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_fp32_chunked_gram_matches_float64(d, dtype):
    """The CPU path of the slicing engine: fp32 products over token chunks, upper panels mirrored, chunk sums added
    in float64. Small-integer data is exact in every dtype; random data stays within the documented fp32 bound.
    Masked tokens are never read (NaN there does not leak) and ``out`` accumulates."""
    from dynslice.core.kernels import masked_gram_fp32

    g = torch.Generator().manual_seed(d)
    mask = torch.rand(3, 40, generator=g) > 0.3
    for data, bound in (
        (torch.randint(-4, 5, (3, 40, d), generator=g).double(), 0.0),
        (torch.randn(3, 40, d, generator=g, dtype=torch.float64), 1e-6),
    ):
        x = data.to(dtype)
        x[~mask] = float("nan")
        kept = x[mask].double()
        ref = kept.T @ kept
        out = torch.eye(d, dtype=torch.float64)
        h = masked_gram_fp32(x, mask, out=out, chunk_tokens=16)
        assert h is out
        h = h - torch.eye(d, dtype=torch.float64)
        assert torch.equal(h, h.T)
        assert float((h - ref).norm() / ref.norm()) <= (bound if dtype != torch.float64 else 1e-12)
