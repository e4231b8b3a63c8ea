"""Recovery fine-tuning (RFT): LoRA adapters trained on a sliced model with ``peft`` and transformers' ``Trainer``,
then merged into the weights.

The defaults follow SliceGPT's RFT script (``microsoft/TransformerCompression``, ``experiments/run_finetuning.py``)
where it has one, scaled down so that the CPU default finishes in minutes on SmolLM2-135M:

========================  =====================================  ==========================================
setting                   dynslice default                       SliceGPT ``run_finetuning.py`` default
========================  =====================================  ==========================================
dataset / split           ``wiki`` / ``train`` (offline)         ``wikitext2`` / ``train``
windows, length           128 × 256 tokens                       4096 × 2048 tokens
batch × accumulation      1 × 4                                  1 × 4
learning rate, schedule   2e-4, linear decay, no warm-up         2e-4, linear, 400 warm-up steps
AdamW                     betas (0.9, 0.95), eps 1e-8, wd 0.01   the same
gradient clipping         1.0                                    1.0
LoRA r / alpha / dropout  8 / 32 / 0.1                           8 / 32 / 0.1
LoRA targets              q, k, v, o, gate, up, down             ``attn_head_and_mlp`` (the same linears)
evaluation / checkpoint   every 16 steps                         every 16 steps
========================  =====================================  ==========================================

The shortcut matrices are not trained by default, as in SliceGPT's default target option; ``targets`` may add
them (``shortcuts``: SliceGPT's ``attn_head_and_mlp_with_Q``) and the head (``head``). Unlike SliceGPT there is no
early stopping and no return to the best checkpoint: a run takes exactly ``steps`` optimizer steps, so that an
interrupted run resumed from its checkpoint ends where an uninterrupted one does.

Checkpoints go to a folder dynslice owns: it holds ``.dynslice-rft.json``, which names the fine-tuning config, the
model and the size and SHA-256 of every checkpoint file. A later call with the same config and model resumes from
the newest checkpoint whose files still match; older checkpoints and, after the final save, the folder itself are
removed through :func:`dynslice.store.ownership.remove_owned`, which never touches a file it cannot prove it wrote.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynslice.core.adapters import get_adapter
from dynslice.core.checks import MAX_SAMPLES, MAX_SEQLEN
from dynslice.experiment.config import DATASETS, SPLITS, Option
from dynslice.measure import data
from dynslice.store import ownership
from dynslice.store.jsonio import read_json, write_json

#: What a LoRA adapter may be put on, by role in each decoder layer (named by the architecture's adapter).
TARGETS: tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_out", "shortcuts", "head")
#: SliceGPT's ``attn_head_and_mlp``: every linear of attention and MLP, not the shortcut matrices.
DEFAULT_TARGETS: tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_out")
#: SliceGPT's AdamW and clipping (fixed here; ``run_finetuning.py``'s defaults).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
#: The checkpoint folder's ownership record.
MARKER = ".dynslice-rft.json"
CHECKPOINT_PREFIX = "checkpoint-"
MAX_STEPS = 10_000_000


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **kw)})


@dataclass(frozen=True)
class FinetuneConfig:
    """Every input of one recovery fine-tuning; a profile's ``rft:`` section maps onto it key for key."""

    dataset: str = _opt("wiki", "corpus of the training windows", choices=DATASETS, cli_choices=False)
    split: str = _opt("train", "split of the training corpus", choices=SPLITS)
    nsamples: int = _opt(128, "distinct training windows", kind="int", low=1, high=MAX_SAMPLES)
    seqlen: int = _opt(256, "tokens per training window", kind="int", low=2, high=MAX_SEQLEN)
    steps: int = _opt(32, "optimizer steps", kind="int", low=1, high=MAX_STEPS)
    learning_rate: float = _opt(2e-4, "peak learning rate (linear decay to 0), > 0 and <= 1", kind="float")
    warmup_steps: int = _opt(0, "linear warm-up steps, <= steps", kind="int", low=0, high=MAX_STEPS)
    weight_decay: float = _opt(0.01, "AdamW weight decay, in [0, 1]", kind="float")
    batch_size: int = _opt(1, "windows per forward pass", kind="int", low=1, high=MAX_SAMPLES)
    grad_accum: int = _opt(4, "forward passes per optimizer step", kind="int", low=1, high=4096)
    lora_r: int = _opt(8, "LoRA rank", kind="int", low=1, high=4096)
    lora_alpha: float = _opt(32.0, "LoRA scale numerator (the update is scaled by alpha / r), > 0", kind="float")
    lora_dropout: float = _opt(0.1, "dropout on the LoRA input, in [0, 1)", kind="float")
    targets: tuple[str, ...] = _opt(
        DEFAULT_TARGETS, "where LoRA adapters go (per layer; head: the LM head)", kind="names", choices=TARGETS
    )
    seed: int = _opt(
        42, "seed of the windows, the LoRA initialisation, the order and the dropout", kind="int", low=0, high=2**32 - 1
    )
    eval_nsamples: int = _opt(
        8, "held-out windows for the evaluation loss (validation split)", kind="int", low=1, high=MAX_SAMPLES
    )
    eval_steps: int = _opt(16, "evaluate every N steps (0: never)", kind="int", low=0, high=MAX_STEPS)
    save_steps: int = _opt(16, "checkpoint every N steps (0: never)", kind="int", low=0, high=MAX_STEPS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", OPTIONS["targets"].coerce(self.targets))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its range."""
        for f in dataclasses.fields(self):
            f.metadata["option"].check(f.name, getattr(self, f.name))
        _in_range("learning_rate", self.learning_rate, "0 < learning_rate <= 1", lambda v: 0 < v <= 1)
        _in_range("weight_decay", self.weight_decay, "0 <= weight_decay <= 1", lambda v: 0 <= v <= 1)
        _in_range("lora_alpha", self.lora_alpha, "0 < lora_alpha <= 1e6", lambda v: 0 < v <= 1e6)
        _in_range("lora_dropout", self.lora_dropout, "0 <= lora_dropout < 1", lambda v: 0 <= v < 1)
        if not self.targets:
            raise ValueError(f"targets: empty; name at least one of {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {list(self.targets)} names a target twice")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is outside 0..steps ({self.steps})")

    @classmethod
    def from_mapping(cls, where: str, obj: object) -> FinetuneConfig:
        """The config of a mapping (a profile's ``rft:`` section); errors name ``where.key``."""
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: must be a mapping of {', '.join(OPTIONS)}")
        unknown = sorted(str(k) for k in obj if k not in OPTIONS)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(OPTIONS)}")
        values = {k: OPTIONS[k].coerce(v) for k, v in obj.items()}
        for k, v in values.items():  # the type first, so that the range checks see a value of the right type
            OPTIONS[k].check(f"{where}.{k}", v)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(FinetuneConfig)}


def _in_range(name: str, value: float, allowed: str, ok) -> None:
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: {value!r} is outside {allowed}")


# -------------------------------------------------------------------------------------------------- targets
def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the linears that get LoRA adapters, found through the architecture's adapter (by class)."""
    adapter = get_adapter(model)
    wanted: list[nn.Module] = []
    for layer in adapter.layers:
        parts = adapter.parts(layer)
        roles = {
            "attn_in": parts.attn_in,
            "attn_out": (parts.attn_out,),
            "mlp_in": parts.mlp_in,
            "mlp_out": (parts.mlp_out,),
            "shortcuts": tuple(
                m for m in (getattr(layer, "attn_shortcut", None), getattr(layer, "mlp_shortcut", None)) if m
            ),
        }
        for t in targets:
            if t != "head":
                wanted.extend(roles[t])
    if "head" in targets:
        wanted.append(adapter.head)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in wanted]


# ------------------------------------------------------------------------------------------------ data
class Windows(torch.utils.data.Dataset):
    """Token windows as causal-LM examples (the labels are the inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


def training_windows(tokenizer, cfg: FinetuneConfig) -> tuple[Windows, Windows | None]:
    """The seeded training windows of ``cfg``, and the held-out validation windows when it evaluates."""
    train = data.calibration_batch(cfg.dataset, tokenizer, cfg.nsamples, cfg.seqlen, seed=cfg.seed, split=cfg.split)
    held = None
    if cfg.eval_steps:
        held = Windows(data.random_chunks(cfg.dataset, tokenizer, cfg.eval_nsamples, cfg.seqlen, seed=cfg.seed))
    return Windows(train["input_ids"]), held


# ------------------------------------------------------------------------------------------- checkpoints
def _marker(folder: Path) -> dict | None:
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("dynslice_rft") == 1 else None


def check_checkpoints(folder: str | Path, cfg: FinetuneConfig, model_key: dict) -> dict | None:
    """Refuse a checkpoint folder that dynslice may not use for (``cfg``, ``model_key``), writing nothing; its
    marker when it holds this fine-tuning's checkpoints.

    Allowed: a missing or empty folder, or one whose marker names the same config and model.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"checkpoint_dir: {folder} is not a folder dynslice can write checkpoints into")
    marker = _marker(folder) if folder.is_dir() else None
    if folder.is_dir() and marker is None and any(folder.iterdir()):
        raise ValueError(
            f"checkpoint_dir: {folder} is a non-empty folder without {MARKER}; dynslice did not create it "
            "(choose a new or empty folder)"
        )
    want = {"config": cfg.to_json(), "model": model_key}
    if marker is not None:
        if {"config": marker.get("config"), "model": marker.get("model")} != want:
            raise ValueError(
                f"checkpoint_dir: {folder} holds checkpoints of another fine-tuning (config or model differ); "
                "choose another folder, or delete it to start over"
            )
    return marker


def open_checkpoints(folder: str | Path, cfg: FinetuneConfig, model_key: dict) -> Path | None:
    """Prepare ``folder`` (:func:`check_checkpoints`) for the checkpoints of (``cfg``, ``model_key``): a new
    marker, or the checkpoint to resume from when it holds one of this fine-tuning's that is still intact."""
    folder = Path(folder)
    marker = check_checkpoints(folder, cfg, model_key)
    if marker is not None:
        return latest_checkpoint(folder, marker)
    want = {"config": cfg.to_json(), "model": model_key}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {"dynslice_rft": 1, "id": ownership.new_id(), **want, "files": {}})
    return None


def _step_of(name: str) -> int:
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
    return int(m.group(1)) if m else -1


def _listing(marker: dict) -> dict[str, list[ownership.Entry]]:
    return {rel: [(int(e["bytes"]), str(e["sha256"]))] for rel, e in marker.get("files", {}).items()}


def latest_checkpoint(folder: Path, marker: dict) -> Path | None:
    """The newest ``checkpoint-N`` folder whose every listed file is still the one dynslice wrote."""
    listing = _listing(marker)
    by_checkpoint: dict[str, list[str]] = {}
    for rel in listing:
        by_checkpoint.setdefault(rel.split("/")[0], []).append(rel)
    for name in sorted(by_checkpoint, key=_step_of, reverse=True):
        if _step_of(name) >= 0 and all(ownership.is_ours(folder, rel, listing[rel]) for rel in by_checkpoint[name]):
            return folder / name
    return None


def record_checkpoint(folder: Path, checkpoint: Path) -> None:
    """List a new checkpoint's files in the marker, then remove the older checkpoints that are still ours."""
    marker = _marker(folder)
    if marker is None:
        raise RuntimeError(f"checkpoint_dir: {folder / MARKER} disappeared during fine-tuning")
    files = dict(marker.get("files", {}))
    for rel in ownership.walk_files(checkpoint):
        size, digest = ownership.fingerprint(checkpoint / rel)
        files[f"{checkpoint.name}/{rel}"] = {"bytes": size, "sha256": digest}
    old = {rel: e for rel, e in files.items() if rel.split("/")[0] != checkpoint.name}
    write_json(folder / MARKER, {**marker, "files": files})
    ownership.remove_owned(folder, _listing({"files": old}), keep_top=True)
    write_json(folder / MARKER, {**marker, "files": {r: e for r, e in files.items() if r not in old}})


def discard_checkpoints(folder: str | Path) -> list[str]:
    """Remove a finished fine-tuning's checkpoints (only the files its marker proves ours, then the marker and the
    folders left empty). Returns what was kept (foreign entries)."""
    folder = Path(folder)
    marker = _marker(folder)
    if marker is None:
        return []
    return ownership.remove_owned(folder, _listing(marker), extra=[MARKER])


# ----------------------------------------------------------------------------------------------- training
def _callback(folder: Path | None):
    from transformers import TrainerCallback

    class RecordCheckpoints(TrainerCallback):
        """After each save, list the checkpoint's files in the marker (and drop the older ones)."""

        def on_save(self, args, state, control, **kwargs):
            if folder is not None:
                record_checkpoint(folder, folder / f"{CHECKPOINT_PREFIX}{state.global_step}")

    return RecordCheckpoints()


def finetune(
    model: nn.Module,
    tokenizer,
    cfg: FinetuneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    model_key: dict | None = None,
    callbacks: tuple = (),
) -> dict[str, Any]:
    """Train LoRA adapters on ``model`` (sliced or dense) for ``cfg.steps`` steps and merge them into its weights,
    in place: afterwards ``model`` is the same plain model, of the same class and parameter count, frozen and in
    eval mode.

    ``checkpoint_dir``: checkpoints every ``cfg.save_steps`` steps into this dynslice-owned folder; a second call
    with the same config and ``model_key`` (default: the widths and parameter count) resumes from the newest one.
    ``callbacks``: further transformers ``TrainerCallback`` s (a time budget, say).
    Returns the config, the loss history (Trainer's log: training loss per step, evaluation loss every
    ``eval_steps``), the step resumed from, the trainable parameter count and the time.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    t0 = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    info = getattr(model, "dynslice_info", None)
    key = model_key or {"widths": list(info.widths) if info else None, "parameters": n_params}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = open_checkpoints(folder, cfg, key) if folder is not None else None
    train, held = training_windows(tokenizer, cfg)
    device = next(model.parameters()).device
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(model, cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    scratch = None if folder is not None else tempfile.TemporaryDirectory(prefix="dynslice-rft-")  # Trainer makes
    # its output folder even when it saves nothing: without checkpoints, a private one that is removed afterwards
    outer_rng = random.getstate(), np.random.get_state()  # Trainer seeds Python's, numpy's and torch's RNGs
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        args = TrainingArguments(
            output_dir=str(folder) if folder is not None else scratch.name,
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            adam_beta1=ADAM_BETAS[0],
            adam_beta2=ADAM_BETAS[1],
            adam_epsilon=ADAM_EPS,
            max_grad_norm=MAX_GRAD_NORM,
            logging_steps=1,
            eval_strategy="steps" if held is not None else "no",
            eval_steps=cfg.eval_steps or None,
            save_strategy="steps" if folder is not None and cfg.save_steps else "no",
            save_steps=cfg.save_steps or 1,
            save_total_limit=None,  # older checkpoints are removed by record_checkpoint, through ownership
            seed=cfg.seed,
            data_seed=cfg.seed,
            report_to="none",
            disable_tqdm=not progress,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            save_only_model=False,
        )
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=train,
            eval_dataset=held,
            callbacks=[_callback(folder), *callbacks],
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # the log lines the progress bar would carry
        peft_model.train()
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        except BaseException:
            peft_model.unload()  # the model as it came in (the adapters dropped, not merged)
            model.eval()
            raise
        finally:
            random.setstate(outer_rng[0])
            np.random.set_state(outer_rng[1])
            if scratch is not None:
                scratch.cleanup()
    merged = peft_model.merge_and_unload()
    assert merged is model, "peft's merge_and_unload returned another module"
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    history = [
        {k: v for k, v in entry.items() if k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")}
        for entry in trainer.state.log_history
        if "loss" in entry or "eval_loss" in entry
    ]
    losses = [e["loss"] for e in history if "loss" in e]
    return {
        "config": cfg.to_json(),
        "history": history,
        "final_loss": losses[-1] if losses else None,
        "resumed_from_step": _step_of(resume.name) if resume is not None else 0,
        "trainable_parameters": int(trainable),
        "parameters": int(n_params),
        "time_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------- dynslice finetune
def checkpoint_dir_for(out: str | Path) -> Path:
    """Where ``dynslice finetune --out OUT`` keeps its checkpoints by default: ``OUT.checkpoints`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def finetune_to_folder(
    spec: str,
    out: str | Path,
    cfg: FinetuneConfig,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``dynslice finetune``: load the sliced model folder ``spec``, fine-tune it (:func:`finetune`), save it as a
    sliced model folder at ``out`` (the fine-tuning's config and loss history under ``extra.finetune`` of its
    ``dynslice.json``), then remove the checkpoints unless ``keep_checkpoints``.

    Everything is checked before the model is loaded: the output, the model folder, dtype, device, the window length
    against the model's context, and the checkpoint folder (default: :func:`checkpoint_dir_for` ``out``).
    """
    from transformers import AutoConfig

    from dynslice.store.io import read_sliced_meta, save_sliced
    from dynslice.store.models import load, parse_device, parse_dtype, resolve_spec
    from dynslice.store.outputs import check_model_out

    out = check_model_out(out, overwrite=overwrite)
    r = resolve_spec(spec)
    if r.kind != "sliced":
        raise ValueError(f"model: {spec} is not a sliced model folder (one that `dynslice slice` writes)")
    meta = read_sliced_meta(r.location)
    dtype = dtype or {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[meta.get("dtype", "float32")]
    parse_dtype(dtype)
    parse_device(device)
    ctx = getattr(AutoConfig.from_pretrained(r.location), "max_position_embeddings", None)
    if ctx and cfg.seqlen > ctx:
        raise ValueError(f"seqlen: {cfg.seqlen} is beyond the model's context of {ctx} tokens (allowed 2..{ctx})")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_dir_for(out)
    if ownership.inside(folder, out) or ownership.inside(out, folder):
        raise ValueError(f"checkpoint_dir: {folder} must lie outside the output folder {out} (and not hold it)")
    key = {"model": r.location, "save_id": meta.get("save_id"), "dtype": dtype}
    check_checkpoints(folder, cfg, key)
    model, tokenizer = load(spec, dtype, device)
    result = finetune(model, tokenizer, cfg, checkpoint_dir=folder, progress=progress, model_key=key)
    source = {"model": spec, "save_id": meta.get("save_id"), "num_parameters": meta.get("num_parameters")}
    extra = {**meta.get("extra", {}), "finetune": {**result, "source": source}}
    save_sliced(model, out, meta["base_model"], tokenizer, extra=extra, overwrite=overwrite)
    if not keep_checkpoints:
        discard_checkpoints(folder)
    return result
