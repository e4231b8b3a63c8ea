"""The arithmetic a run used, and the pinned CPU setting that makes its bits independent of threads and SIMD width.

Rotate-and-slice is chaotic in the last bits: thirty sequential PCAs turn a 1e-7 difference in a Gram matrix
(summation order, SIMD width, thread split) into about 1% of a sliced model's perplexity (measured in
``bench/results/numerics_noise.json``). Two levers keep a reproduction check sharp:

* **Pinning.** :data:`PINNED_ENV` selects ATen's AVX2 kernels, MKL's conditional numerical reproducibility in
  strict mode on its AVX2 code path, and oneDNN's AVX2 kernels. Measured on one CPU, 1, 2 and 4 threads then give
  the same bits, with or without a user's own partial pins. The variables act only when set before torch starts,
  so ``run_all.sh`` exports them for the profiles that declare ``numerics: pinned``.
* **Recording.** :func:`describe` goes into every run record; :func:`arithmetic_key` is the part of it that decides
  the bits. The reproduction check compares bit for bit only where the keys of both sides are equal and pinned,
  and otherwise applies tolerances derived from the measured spread (``dynslice.publish.repro``).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The environment that pins the CPU arithmetic (read by torch, MKL and oneDNN when they start).
PINNED_ENV: Mapping[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
#: Environment variables that change the arithmetic or the thread split; recorded when set.
ENV_VARS = (*PINNED_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS")
#: The values of a profile's ``numerics:`` key.
MODES = ("pinned", "native")


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import datasets
    import torch
    import transformers

    from dynslice import __version__

    out = {
        "dynslice": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return out


def is_pinned(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: this process's environment) holds every variable of :data:`PINNED_ENV`."""
    env = os.environ if env is None else env
    return all(env.get(k, "").strip().lower() == v.lower() for k, v in PINNED_ENV.items())


@lru_cache(maxsize=1)
def cpu() -> dict[str, str]:
    """Vendor, family, model number and name of this CPU (``/proc/cpuinfo``; ``platform`` elsewhere)."""
    info = {"machine": platform.machine()}
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name"}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # pragma: no cover - not Linux
        info["name"] = platform.processor()
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() in fields:
            info[fields[key.strip()]] = value.strip()
    return info


def _blas() -> str:
    """The BLAS torch was built with and its version, from ``torch.__config__.show()``."""
    import torch

    text = torch.__config__.show()
    found = re.search(r"BLAS_INFO=(\w+)", text)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", text)
    name = found.group(1) if found else "unknown"
    return f"{name} {mkl.group(1)}" if name == "mkl" and mkl else name


def describe(device: str = "cpu") -> dict[str, Any]:
    """The arithmetic of this process: pinned or not, SIMD level, threads, BLAS, CPU (or GPU), the variables set.

    Called where a record is written, so it reports what the run used. Setting the variables after torch has
    started does not pin anything, and is not reported as pinned.
    """
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    # Pinned only when the variables were set before torch started: then ATen reports the pinned SIMD level.
    out: dict[str, Any] = {
        "pinned": is_pinned() and isa == "AVX2",
        "isa": isa,
        "threads": torch.get_num_threads(),
        "blas": _blas(),
        "cpu": cpu(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "torch": torch.__version__,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def arithmetic_key(numerics: Mapping[str, Any] | None, versions: Mapping[str, str] | None = None) -> str | None:
    """What decides the bits of a record: ``None`` unless it ran pinned (then threads do not matter).

    Two pinned records with equal keys ran the same arithmetic; the key holds the CPU (vendor, family, model: the
    same pins gave different bits on an Intel and an AMD CPU), the SIMD level, the BLAS, any GPU, and the torch and
    transformers versions.
    """
    if not numerics or not numerics.get("pinned"):
        return None
    c = numerics.get("cpu", {})
    v = versions or {}
    parts = [
        c.get("vendor", "?"),
        c.get("family", "?"),
        c.get("model", "?"),
        str(numerics.get("isa")),
        str(numerics.get("blas")),
        str(numerics.get("gpu", "-")),
        f"torch {v.get('torch', numerics.get('torch'))}",
        f"transformers {v.get('transformers', '?')}",
    ]
    return " / ".join(parts)
