"""GPU check of dynslice.core.kernels.masked_gram: native tests, accuracy, timings against torch baselines.

On a CUDA machine (budget: well under 8 minutes on one H200)::

    python bench/gpu_kernels.py [--out bench/results/gpu_kernels.json]

1. runs ``tests/test_kernels.py`` natively (pytest, no interpreter);
2. for bf16 and fp32 inputs, 65536 tokens (10% masked) × D in (4096, 576), times
   ``masked_gram`` (Triton), its torch fallback, "today's way" (zero-written masked copy, float64 upcast, float64
   matmul) and a plain cuBLAS fp32 ``x.T @ x`` (masked by a multiply), with CUDA events after warmup;
   records each method's error against the float64 result and the top-D/2 eigenvector subspace angle;
3. sweeps a few Triton launch configurations for bf16 and records register/spill counts.

``--cpu`` is a smoke check of the same script on CPU: the torch fallback and today's way at a small size.
Every section is seeded; the JSON is written with ``dynslice.store.jsonio.write_json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dynslice.core.kernels import GramConfig, default_config, masked_gram, triton_available
from dynslice.core.kernels import gram as gram_mod
from dynslice.store.jsonio import write_json

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 7 * 60  # stop starting new sections after this (the whole run must finish within 8 minutes)


def decaying(t: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with singular values 4·10^(-3i/d) in a random orthogonal basis (built in fp32 on device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, device=device, dtype=torch.float32))
    s = 4 * 10.0 ** (-3.0 * torch.arange(d, device=device, dtype=torch.float32) / d)
    return ((torch.randn(t, d, generator=g, device=device, dtype=torch.float32) * s) @ q.T).to(dtype)


def pad_mask(t: int, device: torch.device, frac: float = 0.1, seed: int = 1) -> torch.Tensor:
    """True keeps a token; about ``frac`` of them are masked."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(t, generator=g, device=device) >= frac


def today(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pre-kernel way: zero the masked rows of a copy, upcast everything to float64, one float64 matmul."""
    xz = x.clone()
    xz[~mask] = 0
    xd = xz.double()
    return xd.T @ xd


def fp32_matmul(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cuBLAS fp32 x.T @ x, masked by a multiply: the cost floor of a plain fp32 Gram (one fp32 sum over all
    tokens, TF32 as torch is configured, see ``tf32_matmul``)."""
    xf = x.float() * mask[:, None]
    return xf.T @ xf


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 5) -> dict:
    """Median / min milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def errors(h: torch.Tensor, ref: torch.Tensor, ref_vecs: torch.Tensor | None) -> dict:
    """Relative Frobenius error and (when ref_vecs given) sin of the largest top-k subspace angle."""
    out = {"rel_fro": ((h - ref).norm() / ref.norm()).item(), "symmetric": bool(torch.equal(h, h.T))}
    if ref_vecs is not None:
        k = ref_vecs.shape[1]
        u = torch.linalg.eigh(h)[1][:, -k:]
        out["sin_top_k"] = torch.linalg.matrix_norm(ref_vecs - u @ (u.T @ ref_vecs), ord=2).item()
        out["k"] = k
    return out


def run_tests(timeout: float = 200.0) -> dict:
    """pytest tests/test_kernels.py natively (no interpreter); returns rc, the summary line and the seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = (r.stdout + r.stderr).strip().splitlines()
        return {
            "rc": r.returncode,
            "summary": lines[-1] if lines else "",
            "seconds": time.perf_counter() - t0,
            "failures": [ln for ln in lines if ln.startswith("FAILED")][:20],
        }
    except subprocess.TimeoutExpired:
        return {"rc": None, "summary": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - t0}


def compare(
    t: int, d: int, dtype: torch.dtype, device: torch.device, methods: dict[str, Callable], angles: bool
) -> dict:
    """Time every method on one (tokens, D, dtype) case and measure its error against today's float64 result."""
    x = decaying(t, d, dtype, device)
    mask = pad_mask(t, device)
    ref = today(x, mask)
    ref_vecs = torch.linalg.eigh(ref)[1][:, -(d // 2) :] if angles else None
    case = {"tokens": t, "kept": int(mask.sum()), "d": d, "dtype": str(dtype).replace("torch.", ""), "methods": {}}
    for name, fn in methods.items():
        h = fn(x, mask)
        res = timed(lambda fn=fn, x=x, mask=mask: fn(x, mask), device)
        res.update(errors(h.double(), ref, None if name == "today_float64" else ref_vecs))
        res["gram_tflops"] = 2 * t * d * d / (res["median_ms"] * 1e-3) / 1e12
        case["methods"][name] = res
        del h
    del x, mask, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case


def config_sweep(t: int, d: int, dtype: torch.dtype, device: torch.device, deadline: float) -> list[dict]:
    """Time a few launch configurations of the Triton kernel; record registers and spills per configuration.

    Configurations not started before ``deadline`` (a perf_counter time) are listed as skipped."""
    x = decaying(t, d, dtype, device)
    mask = pad_mask(t, device)
    ref = today(x, mask)
    configs = [
        default_config(dtype),
        GramConfig(block_m=128, block_n=128, block_t=64, num_warps=8, num_stages=3),
        GramConfig(block_m=64, block_n=64, block_t=64, num_warps=4, num_stages=3),
        GramConfig(block_m=64, block_n=128, block_t=64, num_warps=8, num_stages=3),
        GramConfig(block_m=128, block_n=64, block_t=64, chunk_tokens=8192, num_warps=8, num_stages=4),
    ]
    rows = []
    for cfg in configs:
        row = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
        if time.perf_counter() > deadline:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            pairs = gram_mod._tile_pairs(d, cfg, device)
            splits, per_split = gram_mod._split_tokens(pairs.numel() // 2, t, d, cfg, device)
            dest = torch.empty((splits, d, d) if splits > 1 else (d, d), dtype=torch.float64, device=device)
            kernel = gram_mod._launch(x, mask.reshape(-1), dest, pairs, per_split, cfg, accumulate=False)
            row.update(
                splits=splits,
                n_regs=getattr(kernel, "n_regs", None),
                n_spills=getattr(kernel, "n_spills", None),
                shared_bytes=getattr(getattr(kernel, "metadata", None), "shared", None),
            )
            h = masked_gram(x, mask, backend="triton", config=cfg)
            row.update(timed(lambda cfg=cfg: masked_gram(x, mask, backend="triton", config=cfg), device))
            row["rel_fro"] = ((h - ref).norm() / ref.norm()).item()
        except Exception as e:  # an over-large configuration must not sink the rest of the run
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/gpu_kernels.json; with --cpu, gpu_kernels_cpu.json)",
    )
    ap.add_argument("--cpu", action="store_true", help="smoke check on CPU: torch fallback at a small size")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/test_kernels.py first")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no section after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("no CUDA device; use --cpu for the smoke check")
    out = args.out or ROOT / "bench" / "results" / ("gpu_kernels_cpu.json" if args.cpu else "gpu_kernels.json")
    record: dict = {
        "mode": "cpu-smoke" if args.cpu else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "triton": __import__("triton").__version__ if triton_available() else None,
            "cuda": torch.version.cuda,
        },
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "notes": {
            "today_float64": "clone, zero masked rows, .double(), float64 x.T @ x (the reference)",
            "fp32_matmul": "xf = x.float() * mask; xf.T @ xf (cuBLAS fp32, one sum over all tokens)",
            "gram_tflops": "2·tokens·D² / time, for every method alike",
        },
    }
    if device.type == "cuda" and not args.skip_tests:
        record["tests"] = run_tests(timeout=min(200.0, args.budget_s / 2))
        print("tests:", record["tests"]["summary"], flush=True)

    if args.cpu:
        cases = [(4096, 256, torch.bfloat16), (4096, 256, torch.float32)]
        methods = {
            "masked_gram_torch": lambda x, m: masked_gram(x, m, backend="torch"),
            "today_float64": today,
            "fp32_matmul": fp32_matmul,
        }
    else:
        cases = [
            (65536, 576, torch.bfloat16),
            (65536, 576, torch.float32),
            (65536, 4096, torch.bfloat16),
            (65536, 4096, torch.float32),
        ]
        methods = {
            "masked_gram_triton": lambda x, m: masked_gram(x, m, backend="triton"),
            "masked_gram_torch": lambda x, m: masked_gram(x, m, backend="torch"),
            "today_float64": today,
            "fp32_matmul": fp32_matmul,
        }
    record["cases"] = []
    for t, d, dtype in cases:
        if time.perf_counter() - t_start > args.budget_s:
            record["cases"].append({"tokens": t, "d": d, "dtype": str(dtype), "skipped": "time budget"})
            continue
        case = compare(t, d, dtype, device, methods, angles=True)
        record["cases"].append(case)
        print(
            f"{t}x{d} {case['dtype']}: "
            + ", ".join(f"{k} {v['median_ms']:.2f} ms (rel {v['rel_fro']:.1e})" for k, v in case["methods"].items()),
            flush=True,
        )
        write_json(out, record)  # keep what is done if a later section runs out of time

    if device.type == "cuda":
        record["config_sweep"] = {}
        for d in (4096, 576):
            if time.perf_counter() - t_start > args.budget_s:
                record["config_sweep"][str(d)] = "skipped: time budget"
                continue
            record["config_sweep"][str(d)] = config_sweep(65536, d, torch.bfloat16, device, t_start + args.budget_s)
    record["seconds"] = time.perf_counter() - t_start
    write_json(out, record)
    print(f"wrote {out} in {record['seconds']:.0f} s")
    tests_ok = record.get("tests", {}).get("rc", 0) == 0
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
