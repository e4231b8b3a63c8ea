"""The one prepared GPU run of issue 20: the paper's shapes on one GPU in under 8 minutes, one JSON.

Four parts, each in its own subprocess with a hard deadline (a part that runs out of time is recorded as timed out and
the next one starts), so that the whole run ends inside ``--budget-s`` (default 460 s on a GPU):

1. ``kernels``: ``bench/gpu_kernels.py`` (the Triton ``masked_gram`` tests run natively, accuracy and timings);
2. ``paper_shape``: ``bench/paper_shape.py`` on a random-init Llama-3-8B in fp16 (32 layers, 128 x 2048 calibration
   tokens): slicing resident on the GPU, its measured peak GPU memory and host RAM against
   :func:`dynslice.store.memory.predict`, and greedy decode tokens/s, dense vs sliced;
3. ``sweep``: three runs (constant, SB 0.2, SB 0.1 at SP 0.3) of the same model folder through
   :func:`dynslice.experiment.pipeline.run` on one shared :class:`~dynslice.experiment.pipeline.Workbench` (what
   :func:`dynslice.experiment.sweep.run_sweep` does), ``protocol: reference``, on the offline ``wiki`` corpus read
   through a byte-level tokenizer saved in the folder. Before each run the GPU's peak
   (``torch.cuda.reset_peak_memory_stats``) and the process's peak RSS (``/proc/self/clear_refs``) are reset; after it,
   ``max_memory_allocated`` and VmHWM are recorded next to the plan of that run
   (:func:`dynslice.experiment.pipeline.placement`, today the plan of its slicing step).

The random-init model is built once (initialised on the GPU, saved as safetensors) and shared by parts 2 and 3.
``--tiny`` runs the same code paths on the CPU at reduced shapes (widths / 16, 2 layers, small samples) in about
two minutes, to know the script works before a GPU is paid for; it writes ``gpu_paper_tiny.json``.

Run: ``python bench/gpu_paper.py`` (GPU) or ``python bench/gpu_paper.py --tiny``. Writes
``bench/results/gpu_paper.json``. Needs dynslice's dependencies importable (the offline corpus comes from gensim's
test data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import memory_model as mm  # noqa: E402

#: Seconds each part may take at most, as shares of what is left (the rest goes to the later parts).
SHARES = {"kernels": 0.25, "paper_shape": 0.6, "sweep": 1.0}
#: The sweep part's runs: (SP, SB) pairs at equal mean width.
SWEEP_RUNS = ((0.3, 0.3), (0.3, 0.2), (0.3, 0.1))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_part(name: str, cmd: list[str], timeout: float, out: Path) -> dict:
    """Run one part as a subprocess with a deadline; its JSON (``out``) when it wrote one, else what went wrong."""
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(timeout, 1))
        status = {"rc": r.returncode, "tail": (r.stdout + r.stderr)[-3000:] if r.returncode else ""}
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")[-3000:]
        status = {"rc": None, "timed_out_after_s": round(timeout, 1), "tail": tail}
    status["wall_s"] = round(time.perf_counter() - t, 2)
    result = json.loads(out.read_text()) if out.is_file() else None
    print(f"{name}: {'done' if status['rc'] == 0 else status} in {status['wall_s']} s", flush=True)
    return {"status": status, "result": result}


def byte_tokenizer(folder: Path) -> None:
    """Save a byte-level tokenizer (256 byte tokens, BOS 256, EOS 257) in ``folder``: offline, and every id is below
    the reduced shapes' vocabulary too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------- the sweep part
def _status_bytes(field: str) -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process from ``/proc/self/status`` (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` to ``/proc/self/clear_refs``); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def offload_check(cfg, bench) -> dict:
    """Models larger than the GPU: the dense model read with only half of its layers allowed on the GPU (the rest
    offloaded from host RAM), and a sliced model read back the same way, score the same perplexity as when resident."""
    import tempfile

    import torch

    from dynslice.experiment.pipeline import save
    from dynslice.measure.evaluate import perplexity
    from dynslice.store.io import load_sliced
    from dynslice.store.models import load_model, parse_dtype
    from dynslice.store.placement import FORWARD_RESERVE, HEADROOM, model_bytes

    chunks = torch.randint(0, 32000, (4, cfg.ppl_seqlen), generator=torch.Generator().manual_seed(0))
    out: dict = {}
    resident = load_model(cfg.model, cfg.dtype, cfg.device)
    half = int((model_bytes(resident) / 2 + FORWARD_RESERVE) / HEADROOM)
    t = time.perf_counter()
    ppl_res = perplexity(resident, chunks, batch_size=1)
    out["dense_resident"] = {"ppl": ppl_res, "s": round(time.perf_counter() - t, 2)}
    del resident
    torch.cuda.empty_cache()
    offloaded = load_model(cfg.model, cfg.dtype, cfg.device, gpu_bytes=half)
    t = time.perf_counter()
    ppl_off = perplexity(offloaded, chunks, batch_size=1)
    out["dense_offloaded"] = {
        "ppl": ppl_off,
        "s": round(time.perf_counter() - t, 2),
        "devices": sorted({str(v) for v in getattr(offloaded, "hf_device_map", {}).values()}),
        "rel_diff": abs(ppl_off / ppl_res - 1),
    }
    del offloaded
    torch.cuda.empty_cache()
    widths = [int(bench.dims().hidden * 0.7) // 8 * 8] * bench.dims().layers
    with tempfile.TemporaryDirectory() as tmp:
        save(bench.sliced(cfg, widths), cfg, Path(tmp) / "sliced")
        torch.cuda.empty_cache()
        a = load_sliced(Path(tmp) / "sliced", dtype=parse_dtype(cfg.dtype), device=cfg.device)
        ppl_a = perplexity(a, chunks, batch_size=1)
        small = int((model_bytes(a) / 2 + FORWARD_RESERVE) / HEADROOM)
        del a
        torch.cuda.empty_cache()
        b = load_sliced(Path(tmp) / "sliced", dtype=parse_dtype(cfg.dtype), device=cfg.device, gpu_bytes=small)
        ppl_b = perplexity(b, chunks, batch_size=1)
        out["sliced"] = {"ppl_resident": ppl_a, "ppl_offloaded": ppl_b, "rel_diff": abs(ppl_b / ppl_a - 1)}
    print(f"offload: {out}", flush=True)
    return out


def sweep_part(a: argparse.Namespace) -> int:
    """Three runs of one model folder through ``pipeline.run`` on a shared Workbench; per-run peaks vs the plan."""
    import torch

    from dynslice.experiment.config import RunConfig
    from dynslice.experiment.pipeline import Workbench, placement, run
    from dynslice.store.jsonio import write_json
    from dynslice.store.memory import GIB, Shapes, available_gpu_bytes, plan_run

    gpu = a.device != "cpu"
    base = dict(
        model=str(a.src),
        protocol="reference",
        dtype=a.dtype,
        device=a.device,
        seed=42,
        lr_dataset="wiki",
        lr_nsamples=a.lr_nsamples,
        cal_dataset="wiki",
        cal_nsamples=a.nsamples,
        cal_seqlen=a.seqlen,
        batch_size=a.batch_size,
        ppl_datasets=("wiki",),
        ppl_nsamples=a.ppl_nsamples,
        ppl_seqlen=a.seqlen,
    )
    configs = [RunConfig(**base, sp=sp, sb=sb) for sp, sb in SWEEP_RUNS]
    # host RAM is compared above this baseline (everything imported, nothing loaded), as the plan predicts it
    record: dict = {
        "configs": [c.to_json() for c in configs],
        "runs": [],
        "hwm_reset": None,
        "rss_baseline_bytes": _status_bytes("VmRSS"),
    }
    bench = Workbench.of(configs[0])
    deadline = time.perf_counter() + a.budget_s
    for cfg in configs:
        if time.perf_counter() > deadline:
            record["runs"].append({"sp": cfg.sp, "sb": cfg.sb, "skipped": "time budget"})
            continue
        plan, config = placement(cfg)
        run_plan = None
        if plan is not None:
            run_plan = plan_run(
                Shapes.from_config(config),
                plan,
                lr_batch_tokens=cfg.batch_size * cfg.lr_seqlen,
                eval_batch_tokens=cfg.batch_size * cfg.ppl_seqlen,
                eval_seqlen=cfg.ppl_seqlen,
                gpu_bytes=available_gpu_bytes(cfg.device) if gpu else None,
            )
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        record["hwm_reset"] = _reset_hwm()
        rss0 = _status_bytes("VmRSS")
        t = time.perf_counter()
        rec = run(cfg, Path(a.workdir) / f"run-sb{cfg.sb:.2f}.json", bench=bench, force=True)
        if gpu:
            torch.cuda.synchronize()
        row = {
            "sp": cfg.sp,
            "sb": cfg.sb,
            "wall_s": round(time.perf_counter() - t, 2),
            "timings_s": rec["timings_s"],
            "ppl": rec["ppl"],
            "widths_min_max": [min(rec["widths"]), max(rec["widths"])],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else 0,
            "peak_rss_bytes": _status_bytes("VmHWM"),
            "rss_at_start_bytes": rss0,
            "plan": None if plan is None else plan.to_json(),
            "run_plan": None if run_plan is None else run_plan.to_json(),
        }
        if run_plan is not None and gpu and run_plan.peak_gpu_bytes:
            row["gpu_measured_over_run_plan"] = round(row["peak_gpu_bytes"] / run_plan.peak_gpu_bytes, 3)
        if plan is not None:
            row["predicted_peak_gpu_bytes"] = plan.peak_gpu_bytes
            row["predicted_peak_host_bytes"] = plan.peak_host_bytes
            if row["peak_rss_bytes"] and record["rss_baseline_bytes"] and record["hwm_reset"]:
                row["peak_host_above_baseline_bytes"] = row["peak_rss_bytes"] - record["rss_baseline_bytes"]
            if gpu and plan.peak_gpu_bytes:
                row["gpu_measured_over_plan"] = round(row["peak_gpu_bytes"] / plan.peak_gpu_bytes, 3)
        record["runs"].append(row)
        print(
            f"sweep sb={cfg.sb:.2f}: {row['wall_s']} s, GPU peak {row['peak_gpu_bytes'] / GIB:.2f} GiB "
            f"(plan {(plan.peak_gpu_bytes if plan else 0) / GIB:.2f}), ppl {rec['ppl']}",
            flush=True,
        )

        write_json(a.out, record)  # what is done survives a later timeout
    if gpu and time.perf_counter() < deadline:
        record["offload"] = offload_check(configs[0], bench)
        write_json(a.out, record)
    gpu_peaks = [r["peak_gpu_bytes"] for r in record["runs"] if "peak_gpu_bytes" in r]
    if len(gpu_peaks) > 1 and gpu:
        record["gpu_peak_growth_first_to_last"] = round(gpu_peaks[-1] / gpu_peaks[0], 3)
    from dynslice.store.jsonio import write_json

    write_json(a.out, record)
    return 0


# --------------------------------------------------------------------------------------------------- orchestrator
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="reduced shapes on the CPU: the same code paths, ~2 minutes")
    p.add_argument("--budget-s", type=float, default=None, help="the whole run's deadline (default 460; --tiny 240)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="where the models are written (default: a temp folder)")
    p.add_argument("--parts", nargs="+", default=list(SHARES), choices=list(SHARES))
    # the sweep part, run by the orchestrator in its own process
    p.add_argument("--part", choices=["sweep"], help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp16", help=argparse.SUPPRESS)
    p.add_argument("--nsamples", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--seqlen", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--lr-nsamples", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--ppl-nsamples", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.part == "sweep":
        return sweep_part(a)

    import torch

    t0 = time.perf_counter()
    budget = a.budget_s or (240.0 if a.tiny else 460.0)
    if not a.tiny and not torch.cuda.is_available():
        p.error("no CUDA device; --tiny runs the same code paths on the CPU")
    device = "cpu" if a.tiny else "cuda"
    dtype = "fp32" if a.tiny else "fp16"  # fp16 on the CPU is slow and not what a user runs there
    out = a.out or RESULTS / ("gpu_paper_tiny.json" if a.tiny else "gpu_paper.json")
    layers, shrink = (2, 16) if a.tiny else (32, 1)
    cfg = mm.shaped(mm.LLAMA3_8B, layers, shrink)
    sizes = {
        "paper_shape": {"nsamples": 8, "seqlen": 128, "new_tokens": 16} if a.tiny else {},
        "sweep": (
            {"nsamples": 8, "seqlen": 128, "lr_nsamples": 4, "ppl_nsamples": 4, "batch_size": 4}
            if a.tiny
            else {"nsamples": 32, "seqlen": 2048, "lr_nsamples": 16, "ppl_nsamples": 8, "batch_size": 8}
        ),
    }
    record: dict = {
        "tiny": a.tiny,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": dtype,
        "model": {"shape": "Llama-3-8B", "layers": layers, "width_divisor": shrink, "init": "random, seed 0"},
        "budget_s": budget,
        "sizes": sizes,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "parts": {},
    }

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        if "kernels" in a.parts:
            share = SHARES["kernels"] * left()
            cmd = [sys.executable, str(BENCH / "gpu_kernels.py"), "--out", str(tmp / "kernels.json")]
            cmd += ["--cpu"] if a.tiny else []
            cmd += ["--budget-s", str(round(0.8 * share))]
            record["parts"]["kernels"] = run_part("kernels", cmd, share, tmp / "kernels.json")
        t = time.perf_counter()
        src = mm.build_model(cfg, tmp / "dense", dtype, init_device=device)
        byte_tokenizer(src)
        record["build_s"] = round(time.perf_counter() - t, 2)
        if "paper_shape" in a.parts:
            share = SHARES["paper_shape"] * left()
            cmd = [sys.executable, str(BENCH / "paper_shape.py"), "--src", str(src), "--dtype", dtype]
            cmd += ["--modes", "memory", "--out", str(tmp / "paper_shape.json"), "--workdir", str(tmp)]
            cmd += ["--tiny"] if a.tiny else []
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in sizes["paper_shape"].items()]
            record["parts"]["paper_shape"] = run_part("paper_shape", cmd, share, tmp / "paper_shape.json")
        if "sweep" in a.parts:
            share = SHARES["sweep"] * left() - 5
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "sweep", "--src", str(src)]
            cmd += ["--device", device, "--dtype", dtype, "--out", str(tmp / "sweep.json"), "--workdir", str(tmp)]
            cmd += ["--budget-s", str(round(0.8 * share))]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in sizes["sweep"].items()]
            record["parts"]["sweep"] = run_part("sweep", cmd, share, tmp / "sweep.json")
    record["total_s"] = round(time.perf_counter() - t0, 2)
    from dynslice.store.jsonio import write_json

    write_json(out, record)
    print(f"wrote {out} in {record['total_s']} s")
    return 0 if all(part["status"]["rc"] == 0 for part in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
