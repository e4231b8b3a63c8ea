"""The paper's setting at full size on one GPU: slice a random-init Llama-3-8B-shaped model (32 layers, bf16) at
SP 0.3 with 128 × 2048 calibration tokens (fp16, the authors' dtype, by default; ``--dtype bf16``), and compare memory and
speed with :mod:`dynslice.store.memory`'s predictions.

Steps (each slicing run in a fresh subprocess, so that its peaks are its own):

1. build the random-init model (initialised on the GPU when there is one) and save it as safetensors (``--src``: use a
   folder built earlier, as ``bench/gpu_paper.py`` does);
2. slice it resident on the GPU (``memory``: the model and the signals on the GPU) and streaming (``stream``: one
   layer at a time read from disk, computed on the GPU, signals in host RAM): wall time, engine time split, peak
   host RAM (``ru_maxrss`` above the imported baseline) and peak GPU memory (``max_memory_allocated``), each next
   to the prediction;
3. greedy decode tokens/s, batch 1, dense vs sliced; the two sliced outputs' logits compared.

Real data is not needed: a random-init model has no language to calibrate on, so calibration tokens are random
ids (seeded). ``--tiny`` runs the same steps on reduced shapes (widths / 16, 2 layers, 8 × 128 tokens) on the CPU
in about a minute, to know the script works.

Run: ``python bench/paper_shape.py`` (GPU, about 5 minutes on one H200) or ``python bench/paper_shape.py --tiny``.
Writes ``bench/results/paper_shape_gpu.json`` (``--tiny``: ``paper_shape_tiny.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_model as mm
import torch

from dynslice.store.jsonio import write_json
from dynslice.store.memory import Shapes, predict, round_down

RESULTS = Path(__file__).resolve().parent / "results"


def decode_tokens_per_s(
    folder: Path, sliced: bool, device: str, dtype: torch.dtype, vocab: int, new_tokens: int, prompt_len: int = 128
) -> float:
    """Greedy decode speed (tokens/s, batch 1, KV cache) of the model saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    from dynslice.store.io import load_sliced

    model = (
        load_sliced(folder, dtype=dtype, device=device)
        if sliced
        else AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    )
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(3)).to(device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        if device != "cpu":
            torch.cuda.synchronize()
    rate = new_tokens / (time.perf_counter() - t)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="reduced shapes on the CPU: a check that the script runs")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128; --tiny: 8)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 2048; --tiny: 128)")
    p.add_argument("--sp", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    p.add_argument("--new-tokens", type=int, default=128, help="decode length for tokens/s")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="weights and signals")
    p.add_argument("--src", type=Path, default=None, help="a random-init model folder built earlier (skips the build)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--workdir", type=Path, default=None, help="where the dense and sliced models are written")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    layers = a.layers or (2 if a.tiny else 32)
    nsamples = a.nsamples or (8 if a.tiny else 128)
    seqlen = a.seqlen or (128 if a.tiny else 2048)
    cfg = mm.shaped(mm.LLAMA3_8B, layers, 16 if a.tiny else 1)
    out = a.out or RESULTS / ("paper_shape_tiny.json" if a.tiny else "paper_shape_gpu.json")
    dtype = a.dtype

    from transformers import AutoConfig

    shapes = Shapes.from_config(AutoConfig.for_model("llama", **{k: v for k, v in cfg.items() if k != "model_type"}))
    widths = [round_down(shapes.hidden * (1 - a.sp), 8)] * layers
    record: dict = {
        "config": cfg,
        "tiny": a.tiny,
        "device": device,
        "dtype": dtype,
        "sp": a.sp,
        "widths": widths,
        "calibration": {
            "nsamples": nsamples,
            "seqlen": seqlen,
            "batch_size": a.batch_size,
            "tokens": "random ids, seed 0",
        },
        "gpu": torch.cuda.get_device_name() if device != "cpu" else None,
        "load_average": os.getloadavg(),
        "runs": {},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src = a.src or mm.build_model(cfg, tmp / "dense", dtype, init_device=device)
        record["build_s"] = None if a.src else round(time.perf_counter() - t, 2)
        record["weights_on_disk_bytes"] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for mode in a.modes:
            m = mm.measure(
                src,
                tmp / mode,
                mode,
                widths,
                shapes.vocab,
                nsamples,
                seqlen,
                dtype,
                batch_size=a.batch_size,
                threads=os.cpu_count() or 1,
                device=device,
            )
            pr = predict(
                shapes,
                nsamples,
                seqlen,
                dtype,
                mode=mode,
                device=device,
                batch_size=a.batch_size,
                widths=widths,
                resident=device != "cpu" and mode == "memory",
            )
            record["runs"][mode] = {
                "wall_s": round(m["wall_s"], 2),
                "timings_s": m["timings_s"],
                "peak_host_bytes": m["peak_bytes"],
                "predicted_peak_host_bytes": pr.peak_host_bytes,
                "peak_gpu_bytes": m["gpu_peak_bytes"],
                "predicted_peak_gpu_bytes": pr.peak_gpu_bytes,
                "output_bytes": sum(f.stat().st_size for f in (tmp / mode).glob("*.safetensors")),
                "predicted_output_bytes": pr.output_bytes,
            }
            print(mode, json.dumps(record["runs"][mode]), flush=True)
            write_json(out, record)  # kept if a later step runs out of time (bench/gpu_paper.py)
        if {"memory", "stream"} <= set(a.modes):
            record["logits_rel_diff_memory_vs_stream"] = mm._logits_diff(tmp / "memory", tmp / "stream", shapes.vocab)
        sliced_dir = tmp / a.modes[0]
        tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        record["decode_tokens_per_s"] = {
            "dense": round(decode_tokens_per_s(src, False, device, tdt, shapes.vocab, a.new_tokens), 2),
            "sliced": round(decode_tokens_per_s(sliced_dir, True, device, tdt, shapes.vocab, a.new_tokens), 2),
        }
    record["total_s"] = round(time.perf_counter() - t_all, 2)
    write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
