"""Measured vs predicted peak host RAM of slicing, in-RAM and streaming, on random-init models of real shapes.

For each config (Llama-3-8B and Mistral-7B shapes with the layer count cut, plus scaled-down variants used by the
tests), a random-init model is saved as safetensors, then sliced in a fresh subprocess, once in RAM
(``from_pretrained`` + :func:`dynslice.core.slicing.slice_model` + :func:`dynslice.store.io.save_sliced`) and once streaming
(:func:`dynslice.store.stream.slice_streaming`). The subprocess reports its peak RSS (VmHWM) minus its RSS once everything is
imported; :func:`dynslice.store.memory.predict` (``weights="mapped"``: the checkpoint is loaded in its own dtype) gives the
prediction. The peak of one run varies by about ±10% on the reduced shapes (glibc reuses freed heap blocks in an
order that differs from run to run), so each mode runs ``--repeats`` times and the median is compared; every run's
peak is recorded. Also recorded: wall times (streaming vs in-RAM), logits agreement of the two outputs, and the ratio
of the weights on disk to the streaming peak.

Run: ``python bench/memory_model.py [--configs llama3-8b-1l/4 mistral-7b-1l/4] [--nsamples 16 --seqlen 256]
[--repeats 5]``. Writes ``bench/results/memory_model.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "memory_model.json"

#: Real configs (Llama-3.1-8B: Llama-3-8B's shapes with the llama3 rope scaling; Mistral-7B-v0.1) with the layer count cut; ``/k`` variants divide the widths.
LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
MISTRAL_7B = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def shaped(base: dict, layers: int, shrink: int = 1) -> dict:
    """``base`` with ``layers`` decoder layers and the widths divided by ``shrink`` (heads kept: head_dim shrinks)."""
    cfg = dict(base, num_hidden_layers=layers)
    if shrink > 1:
        cfg.update(
            hidden_size=base["hidden_size"] // shrink,
            intermediate_size=base["intermediate_size"] // shrink,
            vocab_size=base["vocab_size"] // shrink,
        )
    return cfg


CONFIGS = {
    "llama3-8b-1l": shaped(LLAMA3_8B, 1),
    "mistral-7b-1l": shaped(MISTRAL_7B, 1),
    "llama3-8b-2l": shaped(LLAMA3_8B, 2),
    "llama3-8b-16l": shaped(LLAMA3_8B, 16),  # half of Llama-3-8B at full width: streaming vs in-RAM wall time
    "llama3-8b-32l": shaped(LLAMA3_8B, 32),  # all of Llama-3-8B (16 GB in bf16): the disk / streaming-peak ratio
    "mistral-7b-2l": shaped(MISTRAL_7B, 2),
    "llama3-8b-1l/4": shaped(LLAMA3_8B, 1, 4),
    "llama3-8b-2l/4": shaped(LLAMA3_8B, 2, 4),
    "mistral-7b-2l/4": shaped(MISTRAL_7B, 2, 4),
    "mistral-7b-1l/4": shaped(MISTRAL_7B, 1, 4),
    "llama3-8b-3l/8": shaped(LLAMA3_8B, 3, 8),
    "mistral-7b-3l/8": shaped(MISTRAL_7B, 3, 8),
}

_CHILD = r'''
import json, os, resource, sys, time
import torch
import transformers
from transformers import AutoModelForCausalLM
import dynslice.core.slicing, dynslice.store.stream, dynslice.store.io
import transformers.models.llama.modeling_llama, transformers.models.mistral.modeling_mistral
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
q = torch.randn(1, 2, 8, 16)  # initialise the kernels the run will use, so the baseline includes them
torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
(torch.randn(64, 64) @ torch.randn(64, 64)).sum()
cal = {"input_ids": torch.randint(0, a["vocab"], (a["nsamples"], a["seqlen"]),
                                  generator=torch.Generator().manual_seed(0))}
cal["attention_mask"] = torch.ones_like(cal["input_ids"])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a["dtype"]]
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t = time.perf_counter()
device = a.get("device", "cpu")
if a["mode"] == "stream":
    info = dynslice.store.stream.slice_streaming(a["src"], cal, a["widths"], a["out"], dtype=a["dtype"], progress=False,
                                           batch_size=a["batch_size"], device=device)
else:
    model = AutoModelForCausalLM.from_pretrained(a["src"], dtype=dtype).to(device)
    info = dynslice.core.slicing.slice_model(model, cal, a["widths"], progress=False,
                                        batch_size=a["batch_size"]).dynslice_info
    dynslice.store.io.save_sliced(model, a["out"], a["src"])
if device != "cpu":
    torch.cuda.synchronize()
wall = time.perf_counter() - t

def _hwm() -> int:
    """This process's peak RSS: VmHWM belongs to the address space made at exec, while ru_maxrss keeps the
    parent's high-water mark across fork+exec (a large pytest parent would leak into the measurement)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


peak = _hwm()
gpu = torch.cuda.max_memory_allocated() if device != "cpu" else 0
print(json.dumps({"peak_bytes": peak - base, "gpu_peak_bytes": gpu, "wall_s": wall, "timings_s": info.timings_s}))
'''


def build_model(cfg: dict, folder: Path, dtype: str, seed: int = 0, init_device: str = "cpu") -> Path:
    """Save a random-init model of ``cfg`` (in ``dtype``) to ``folder`` as safetensors, in a subprocess
    (initialised on ``init_device``: a GPU initialises an 8B model in seconds)."""
    code = (
        "import json, sys, torch\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
        "cfg = json.loads(sys.argv[1]); folder, dtype = sys.argv[2], getattr(torch, sys.argv[3])\n"
        "torch.manual_seed(int(sys.argv[4]))\n"
        "c = AutoConfig.for_model(cfg.pop('model_type'), **cfg)\n"
        "m = AutoModelForCausalLM.from_config(c, dtype=dtype)\n"
        "m.save_pretrained(folder)\n"
    )
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if init_device != "cpu":
        code = code.replace(
            "m = AutoModelForCausalLM.from_config(c, dtype=dtype)",
            f"with torch.device({init_device!r}):\n    m = AutoModelForCausalLM.from_config(c, dtype=dtype)",
        )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg), str(folder), names[dtype], str(seed)], check=True, env=_env()
    )
    return folder


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def measure(
    src: Path,
    out: Path,
    mode: str,
    widths: list[int],
    vocab: int,
    nsamples: int,
    seqlen: int,
    dtype: str,
    batch_size: int = 8,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """Peak RSS rise (bytes above the imported baseline), peak GPU memory and wall time of slicing ``src`` in a
    fresh process (``mode`` "memory": the whole model on ``device``; "stream": layers computed on ``device``)."""
    arg = {
        "src": str(src),
        "out": str(out),
        "mode": mode,
        "widths": widths,
        "vocab": vocab,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "dtype": dtype,
        "batch_size": batch_size,
        "threads": threads,
        "device": device,
    }
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(arg)], check=True, capture_output=True, text=True, env=_env()
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(
    name: str,
    cfg: dict,
    nsamples: int,
    seqlen: int,
    dtype: str,
    sp: float,
    workdir: Path,
    modes: tuple[str, ...] = ("memory", "stream"),
    threads: int = 1,
    repeats: int = 1,
) -> dict:
    """Measured (the median of ``repeats`` fresh-process runs) and predicted peaks for one config; both outputs'
    logits compared when both modes ran."""
    from transformers import AutoConfig

    from dynslice.store.memory import Shapes, predict, round_down

    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is outside repeats >= 1")
    cfg_obj = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    shapes = Shapes.from_config(cfg_obj)
    widths = [round_down(shapes.hidden * (1 - sp), 8)] * shapes.layers
    src = build_model(cfg, workdir / "dense", dtype)
    disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    row: dict = {
        "config": name,
        "dtype": dtype,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "widths": widths,
        "weights_on_disk_bytes": disk,
    }
    for mode in modes:
        runs = []
        for k in range(repeats):
            runs.append(
                measure(
                    src, workdir / f"{mode}{k}", mode, widths, shapes.vocab, nsamples, seqlen, dtype, threads=threads
                )
            )
            if k + 1 < repeats:
                shutil.rmtree(workdir / f"{mode}{k}")
        (workdir / f"{mode}{repeats - 1}").rename(workdir / mode)
        peak = int(statistics.median(r["peak_bytes"] for r in runs))
        p = predict(shapes, nsamples, seqlen, dtype, mode=mode, widths=widths, weights="mapped")
        row[mode] = {
            "measured_bytes": peak,
            "measured_runs_bytes": [r["peak_bytes"] for r in runs],
            "predicted_bytes": p.peak_host_bytes,
            "error": round(p.peak_host_bytes / peak - 1, 4),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "phases": p.phase_host_bytes,
        }
    if "stream" in modes:
        row["disk_to_stream_peak"] = round(disk / row["stream"]["measured_bytes"], 3)
    if set(modes) == {"memory", "stream"}:
        row["stream_wall_ratio"] = round(row["stream"]["wall_s"] / row["memory"]["wall_s"], 3)
        row["logits_rel_diff"] = _logits_diff(workdir / "memory", workdir / "stream", shapes.vocab)
    return row


def _logits_diff(a: Path, b: Path, vocab: int) -> float:
    import torch

    from dynslice.store.io import load_sliced

    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(5))
    la = load_sliced(a)(input_ids=ids).logits.float()
    lb = load_sliced(b)(input_ids=ids).logits.float()
    return float((la - lb).abs().max() / la.abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["mistral-7b-1l", "llama3-8b-1l"], choices=sorted(CONFIGS))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--sp", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per mode; the median is compared")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["memory", "stream"],
        choices=["memory", "stream"],
        help="which slicings to measure (stream alone for models larger than this machine's RAM)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from dynslice.store.jsonio import write_json

    rows = []
    for name in a.configs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(
                compare(
                    name,
                    CONFIGS[name],
                    a.nsamples,
                    a.seqlen,
                    a.dtype,
                    a.sp,
                    Path(tmp),
                    modes=tuple(a.modes),
                    threads=a.threads,
                    repeats=a.repeats,
                )
            )
        print(json.dumps(rows[-1]), flush=True)
    write_json(a.out, {"rows": rows, "load_average": os.getloadavg(), "threads": a.threads, "repeats": a.repeats})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
