"""Evaluation: perplexity under the two chunking protocols, and zero-shot accuracy through lm-eval.

- :func:`perplexity` scores fixed-length token chunks: exp of the mean next-token negative log-likelihood over
  every predicted token (log-softmax in fp32, sums in fp64, padded tokens left out).
- :func:`dataset_perplexity` wires it to the named datasets of :mod:`dynslice.measure.data`, with SliceGPT's protocol
  (consecutive chunks of the test split), random windows of the validation split (``paper``), or the authors'
  code (``documents``: SliceGPT's document-joining sampler on the validation split, BOS first, scored as
  exp of the mean of per-sample mean NLLs, at most 128 samples by default).
- :func:`zero_shot` runs lm-eval on a model object (dense or sliced) and reports one headline metric per task;
  the offline tasks of :mod:`dynslice.measure.offline_tasks` run with no hub access.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynslice.core.checks import check_choice, check_int
from dynslice.measure import data
from dynslice.measure.lm_tasks import task_manager
from dynslice.measure.offline_tasks import OFFLINE_METRIC, OFFLINE_TASKS, build_offline_tasks
from dynslice.store.paths import configure_hf_cache

PROTOCOLS = ("slicegpt", "paper", "documents")
REDUCTIONS = ("token", "sample")
#: The authors' default number of perplexity samples (SliceGPT's ``--ppl-eval-nsamples``).
DOCUMENTS_NSAMPLES = 128

STANDARD_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "mmlu")

#: The headline metric reported for each known task (lm-eval metric name, filter ``none``).
METRIC: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "mmlu": "acc",
    **OFFLINE_METRIC,
}


# ----------------------------------------------------------------------------------------------------- perplexity
def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_chunks(chunks: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> None:
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype.is_floating_point:
        raise ValueError(
            f"chunks: expected a 2-D integer tensor (n, seqlen), got "
            f"{type(chunks).__name__} {tuple(getattr(chunks, 'shape', ()))}"
        )
    if chunks.shape[0] < 1 or chunks.shape[1] < 2:
        raise ValueError(f"chunks: shape {tuple(chunks.shape)} needs n >= 1 rows and seqlen >= 2 tokens")
    check_int("batch_size", batch_size, 1)
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != chunks.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(getattr(attention_mask, 'shape', ()))} must equal the "
            f"chunks' shape {tuple(chunks.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    desc: str = "ppl",
    reduction: str = "token",
) -> float:
    """Perplexity of ``model`` on token ``chunks`` (n, seqlen): exp(mean NLL of every predicted next token).

    ``reduction="sample"`` gives the authors' variant instead: exp of the mean over rows of each row's mean NLL.

    The log-softmax is taken in fp32 whatever the model's dtype, NLLs are summed in fp64 over all batches and
    divided by the total token count (not an average of per-batch means). With ``attention_mask``, a position
    counts only when both the token and the one it is predicted from are real (mask 1). ``device`` defaults to
    the model's. The model is put in eval mode and returned to its previous mode afterwards.
    """
    _check_chunks(chunks, attention_mask, batch_size)
    check_choice("reduction", reduction, REDUCTIONS)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    row_means: list[float] = []
    try:
        for start in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, leave=False):
            ids = chunks[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            valid = None if mask is None else (mask[:, 1:] * mask[:, :-1]).bool()
            for row in range(ids.shape[0]):  # one row at a time keeps the fp32 copy of the logits small
                nll = F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="none")
                if valid is not None:
                    nll = nll[valid[row]]
                total_nll += nll.double().sum().cpu()
                total_tokens += int(nll.numel())
                if nll.numel():
                    row_means.append(float(nll.double().mean()))
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("attention_mask: no position has a real token following a real token; nothing to score")
    if reduction == "sample":
        return math.exp(math.fsum(row_means) / len(row_means))
    return math.exp(float(total_nll) / total_tokens)


def dataset_perplexity(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    *,
    seqlen: int,
    protocol: str,
    nsamples: int | None = None,
    seed: int = 42,
    batch_size: int = 8,
    max_chunks: int | None = None,
) -> float:
    """Perplexity on the named dataset under ``protocol``.

    - ``"slicegpt"``: the test split cut into consecutive ``seqlen`` chunks (at most ``max_chunks``);
      ``nsamples`` must be left unset.
    - ``"paper"``: ``nsamples`` random ``seqlen`` windows of the validation split, drawn with ``seed``;
      ``max_chunks`` must be left unset.
    - ``"documents"``: the authors' protocol, at most ``nsamples`` (default :data:`DOCUMENTS_NSAMPLES`) samples
      of the validation split from :func:`dynslice.measure.data.document_batch`, the mean of per-sample means;
      ``max_chunks`` must be left unset.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    check_int("seqlen", seqlen, 2)
    if protocol == "slicegpt":
        if nsamples is not None:
            raise ValueError(
                f"nsamples: {nsamples!r} applies to the 'paper' protocol only; use max_chunks "
                "to cap the 'slicegpt' protocol"
            )
        if max_chunks is not None:
            check_int("max_chunks", max_chunks, 1, allowed="max_chunks >= 1 (or None for all)")
        chunks = data.eval_chunks(name, tokenizer, seqlen, split="test", max_chunks=max_chunks)
    elif protocol == "documents":
        if max_chunks is not None:
            raise ValueError(
                f"max_chunks: {max_chunks!r} applies to the 'slicegpt' protocol only; use nsamples "
                "for the 'documents' protocol"
            )
        n = check_int("nsamples", DOCUMENTS_NSAMPLES if nsamples is None else nsamples, 1)
        batch = data.document_batch(name, tokenizer, n, seqlen, seed=seed, split="validation")
        return perplexity(
            model,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            batch_size=batch_size,
            desc=f"ppl {name}/{protocol}",
            reduction="sample",
        )
    else:
        if max_chunks is not None:
            raise ValueError(
                f"max_chunks: {max_chunks!r} applies to the 'slicegpt' protocol only; use nsamples "
                "for the 'paper' protocol"
            )
        check_int("nsamples", nsamples, 1, allowed="nsamples >= 1 (required by the 'paper' protocol)")
        chunks = data.random_chunks(name, tokenizer, nsamples, seqlen, seed=seed, split="validation")
    return perplexity(model, chunks, batch_size=batch_size, desc=f"ppl {name}/{protocol}")


# ------------------------------------------------------------------------------------------------------ zero-shot
def _check_zero_shot_args(
    tasks: Sequence[str], limit: int | None, batch_size: int, num_fewshot: int, max_length: int
) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"tasks: {tasks!r} must be a non-empty sequence of task names, e.g. {list(METRIC)}")
    names = list(tasks)
    unknown = [t for t in names if t not in METRIC]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not known tasks; known tasks are {sorted(METRIC)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: {names} names a task more than once")
    for arg, value, low in (
        ("batch_size", batch_size, 1),
        ("num_fewshot", num_fewshot, 0),
        ("max_length", max_length, 2),
    ):
        check_int(arg, value, low)
    if limit is not None:
        check_int("limit", limit, 1, allowed="limit >= 1 (or None for every document)")
    return names


def lm_eval_results(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 1234,
    max_length: int = 2048,
    log_samples: bool = False,
) -> dict[str, Any]:
    """The raw ``lm_eval.simple_evaluate`` result for known ``tasks`` on a model object (see :func:`zero_shot`).

    Offline tasks are (re)built first; the built-in task index is scanned (once per process) only when a standard
    task is asked for (:func:`dynslice.measure.lm_tasks.task_manager`). With ``$DYNSLICE_HUB_MIRROR`` set,
    standard tasks whose datasets the mirror holds read them from it (:mod:`dynslice.measure.mirror`). All four
    lm-eval seeds are set to ``seed``.
    """
    names = _check_zero_shot_args(tasks, limit, batch_size, num_fewshot, max_length)
    configure_hf_cache()  # before lm_eval imports datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    offline = [t for t in names if t in OFFLINE_TASKS]
    hub = [t for t in names if t not in OFFLINE_TASKS]
    manager = task_manager(hub, [build_offline_tasks()] if offline else [])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except ConnectionError as err:
        why = (
            "the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
            if data.hub_offline()
            else "the hub cannot be reached"
        )
        raise data.HubUnavailableError(
            f"tasks: {hub} need their Hugging Face hub datasets, {why} and they are not cached; the offline tasks "
            f"{', '.join(OFFLINE_TASKS)} need no hub"
        ) from err
    if out is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the rank-0 process)")
    return out


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def summarize(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{task: {"metric", "value", "stderr"}}`` for each task from an lm-eval result, plus ``"average"``
    (the unweighted mean of the task values; its metric is ``"mean"`` and its stderr ``None``)."""
    summary: dict[str, dict[str, Any]] = {}
    for task in tasks:
        metric = METRIC[task]
        row = results["results"].get(task, {})
        value = _as_float(row.get(f"{metric},none"))
        if value is None:
            raise RuntimeError(f"lm-eval reported no '{metric}' for task {task!r}: {sorted(row)}")
        summary[task] = {"metric": metric, "value": value, "stderr": _as_float(row.get(f"{metric}_stderr,none"))}
    summary["average"] = {
        "metric": "mean",
        "value": sum(s["value"] for s in summary.values()) / len(tasks),
        "stderr": None,
    }
    return summary


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 1234,
    max_length: int = 2048,
) -> dict[str, dict[str, Any]]:
    """Zero-shot (or ``num_fewshot``-shot) accuracy of a model object on ``tasks`` with lm-eval.

    Returns ``{task: {"metric": name, "value": float, "stderr": float | None}}`` with the metric of
    :data:`METRIC` (mmlu is the group's aggregate acc), plus an ``"average"`` entry over the tasks.
    ``limit`` caps the documents per (sub)task. Standard tasks need their hub datasets (or a datasets cache);
    the offline tasks :data:`~dynslice.measure.offline_tasks.OFFLINE_TASKS` need nothing.
    """
    results = lm_eval_results(
        model,
        tokenizer,
        tasks,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        seed=seed,
        max_length=max_length,
    )
    return summarize(results, tasks)
