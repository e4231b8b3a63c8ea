"""Perplexity against a row-by-row reference, the offline lm-eval tasks, and zero-shot through lm-eval."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_batch, make_tiny_model

from dynslice.measure import evaluate as ev
from dynslice.measure import offline_tasks as ot
from dynslice.measure.data import eval_chunks, load_texts, random_chunks


# ----------------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def reference_ppl(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Row by row: run the model on the row's real (unpadded) tokens alone and sum the NLL by hand."""
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        length = ids.shape[1] if mask is None else int(mask[row].sum())
        seq = ids[row, :length]
        logits = model(input_ids=seq[None]).logits[0].float()
        total += float(F.cross_entropy(logits[:-1], seq[1:], reduction="sum").double())
        count += length - 1
    return math.exp(total / count)


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Log-probability of ``continuation`` after ``context`` and whether it is the greedy continuation,
    tokenised as lm-eval does for causal models (encode the whole string, split at the context's length)."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = F.log_softmax(logits[n_ctx - 1 : -1], dim=-1)
    target = torch.tensor(whole[n_ctx:])
    greedy = bool((logprobs.argmax(-1) == target).all())
    return float(logprobs.gather(1, target[:, None]).sum()), greedy


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama on SmolLM2's vocabulary, so the real tokenizer can drive it."""
    return make_tiny_model("llama", vocab=49152, hidden=48, layers=2, seed=3)


@pytest.fixture(scope="module")
def wiki_test_docs() -> list[str]:
    return load_texts("wiki", "test")


# -------------------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("padded", [False, True])
def test_perplexity_matches_row_by_row_reference(padded):
    model = make_tiny_model("llama")
    batch = make_batch(n=7, seqlen=20, padded=padded)
    mask = batch["attention_mask"] if padded else None
    got = ev.perplexity(model, batch["input_ids"], batch_size=3, attention_mask=mask)
    assert got == pytest.approx(reference_ppl(model, batch["input_ids"], mask), rel=1e-6)


def test_padding_is_excluded_not_scored():
    model = make_tiny_model("qwen2")
    batch = make_batch(n=6, seqlen=24, padded=True)
    with_mask = ev.perplexity(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    without = ev.perplexity(model, batch["input_ids"])  # pads (id 0) scored as tokens
    assert with_mask != pytest.approx(without, rel=1e-3)


def test_perplexity_is_batch_size_invariant():
    model = make_tiny_model("mistral")
    batch = make_batch(n=7, seqlen=16, padded=True)
    values = [
        ev.perplexity(model, batch["input_ids"], batch_size=b, attention_mask=batch["attention_mask"])
        for b in (1, 2, 4, 7, 32)
    ]
    assert values == pytest.approx([values[0]] * len(values), rel=1e-6)


def test_perplexity_bf16_uses_fp32_log_softmax_and_restores_mode():
    model = make_tiny_model("llama").to(torch.bfloat16).train()
    ids = make_batch(n=3, seqlen=16, padded=False)["input_ids"]
    got = ev.perplexity(model, ids, batch_size=1)
    assert math.isfinite(got) and model.training
    with torch.no_grad():  # reference: the same bf16 logits, log-softmax in fp32, sums in fp64
        total = sum(
            float(
                F.cross_entropy(
                    model.eval()(input_ids=ids[r : r + 1]).logits[0, :-1].float(), ids[r, 1:], reduction="sum"
                ).double()
            )
            for r in range(3)
        )
    assert got == pytest.approx(math.exp(total / (3 * 15)), rel=1e-6)
    fp32 = ev.perplexity(make_tiny_model("llama"), ids)
    assert got == pytest.approx(fp32, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"chunks": torch.arange(10)}, "chunks"),
        ({"chunks": torch.rand(2, 8)}, "chunks"),
        ({"chunks": torch.zeros(2, 1, dtype=torch.long)}, "chunks"),
        ({"batch_size": 0}, "batch_size"),
        ({"attention_mask": torch.ones(2, 7, dtype=torch.long)}, "attention_mask"),
        ({"attention_mask": torch.full((2, 8), 2)}, "attention_mask"),
        ({"attention_mask": torch.tensor([[1] + [0] * 7] * 2)}, "attention_mask"),
    ],
)
def test_perplexity_rejects_bad_arguments(kwargs, param):
    args = {"chunks": torch.randint(3, 96, (2, 8)), **kwargs}
    with pytest.raises(ValueError, match=f"^{param}:"):
        ev.perplexity(make_tiny_model("llama", layers=1), args.pop("chunks"), **args)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"protocol": "wikitext"}, "protocol"),
        ({"protocol": "slicegpt", "seqlen": 1}, "seqlen"),
        ({"protocol": "slicegpt", "nsamples": 4}, "nsamples"),
        ({"protocol": "slicegpt", "max_chunks": 0}, "max_chunks"),
        ({"protocol": "paper"}, "nsamples"),
        ({"protocol": "paper", "nsamples": 0}, "nsamples"),
        ({"protocol": "paper", "nsamples": 4, "max_chunks": 2}, "max_chunks"),
    ],
)
def test_dataset_perplexity_rejects_bad_arguments(kwargs, param):
    args = {"seqlen": 16, **kwargs}
    with pytest.raises(ValueError, match=f"^{param}:"):
        ev.dataset_perplexity(None, None, "wiki", **args)


def test_dataset_perplexity_uses_the_two_protocols(tiny_lm, smol_tokenizer):
    slicegpt = ev.dataset_perplexity(tiny_lm, smol_tokenizer, "wiki", seqlen=32, protocol="slicegpt", max_chunks=3)
    chunks = eval_chunks("wiki", smol_tokenizer, 32, split="test", max_chunks=3)
    assert slicegpt == pytest.approx(reference_ppl(tiny_lm, chunks), rel=1e-6)
    paper = ev.dataset_perplexity(tiny_lm, smol_tokenizer, "wiki", seqlen=32, protocol="paper", nsamples=3, seed=5)
    windows = random_chunks("wiki", smol_tokenizer, 3, 32, seed=5, split="validation")
    assert paper == pytest.approx(reference_ppl(tiny_lm, windows), rel=1e-6)
    assert paper != pytest.approx(slicegpt, rel=1e-6)


@pytest.mark.slow
def test_smollm2_wiki_perplexity_matches_hf_loss(smol):
    model, tokenizer = smol
    chunks = eval_chunks("wiki", tokenizer, 256, split="test", max_chunks=4)
    got = ev.perplexity(model, chunks, batch_size=2)
    with torch.no_grad():  # equal-length rows: the mean of the rows' mean losses is the overall mean
        losses = [float(model(input_ids=chunks[r : r + 1], labels=chunks[r : r + 1]).loss) for r in range(4)]
    assert got == pytest.approx(math.exp(sum(losses) / 4), rel=1e-4)
    assert 15 < got < 40  # dense SmolLM2-135M on Wikipedia prose at L = 256 is about 24.5


# ----------------------------------------------------------------------------------------------- offline tasks
def test_split_sentences_keeps_abbreviations_and_initials():
    text = "Dr. Smith met J. R. R. Tolkien in the U.S. Army in 1917. They talked! Did they write? Yes."
    assert ot.split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. Army in 1917.",
        "They talked!",
        "Did they write?",
        "Yes.",
    ]


def test_offline_items_are_well_formed(wiki_test_docs):
    flat = [" ".join(doc.split()) for doc in wiki_test_docs]
    cloze = ot.make_cloze_items(wiki_test_docs, 60, seed=1)
    for item in cloze:
        assert item["text"] == item["context"] + item["target"]
        assert item["target"].startswith(" ") and item["target"][1:] == item["text"].split()[-1]
        assert re.search(rf"\b{item['target'][1:]}\b", item["context"])  # LAMBADA-style: inferable from context
        assert len(item["text"].split()) >= 30 and item["text"] + "." in flat[item["doc"]]
    cont = ot.make_continuation_items(wiki_test_docs, 80, seed=1)
    for item in cont:
        choices, true = item["choices"], item["choices"][item["label"]]
        assert len(choices) == ot.N_CHOICES == len(set(choices))
        assert item["context"] + " " + true in flat[item["doc"]]  # the real next sentence
        for k, other in enumerate(choices):
            if k != item["label"]:
                assert other not in flat[item["doc"]]  # a distractor comes from another article
                assert len(true) * 2 / 3 <= len(other) <= len(true) * 3 / 2
        assert all(c.isascii() for c in choices)  # character length == byte length
    assert len({item["label"] for item in cont}) == ot.N_CHOICES


def test_offline_items_reject_impossible_counts(wiki_test_docs):
    with pytest.raises(ValueError, match="^n_cloze:"):
        ot.make_cloze_items(wiki_test_docs, 10**6, seed=0)
    with pytest.raises(ValueError, match="^n_cont:"):
        ot.make_continuation_items(wiki_test_docs, 0, seed=0)


def test_build_offline_tasks_is_deterministic_and_idempotent(tmp_path, monkeypatch):
    outs = []
    for sub in ("a", "b"):
        monkeypatch.setenv("DYNSLICE_CACHE", str(tmp_path / sub))
        outs.append(ot.build_offline_tasks(n_cloze=40, n_cont=50, seed=7))
    a, b = outs
    assert a == tmp_path / "a" / "tasks"
    for name in ot.OFFLINE_TASKS:
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        config = yaml.safe_load((a / f"{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert config["task"] == name and data_file == str((a / f"{name}.jsonl").resolve())
    rows = [json.loads(line) for line in (a / "dynslice_continuation.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and [r["id"] for r in rows] == list(range(50))
    stamps = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    monkeypatch.setenv("DYNSLICE_CACHE", str(tmp_path / "a"))
    ot.build_offline_tasks(n_cloze=40, n_cont=50, seed=7)  # same content: files left untouched
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamps
    ot.build_offline_tasks(n_cloze=40, n_cont=50, seed=8)  # another seed: other items, rewritten in place
    assert [json.loads(line) for line in (a / "dynslice_continuation.jsonl").read_text().splitlines()] != rows
    assert not list(a.glob(".*tmp"))


# --------------------------------------------------------------------------------------------------- zero-shot
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": "piqa"}, "tasks"),
        ({"tasks": ["lambada"]}, "tasks"),
        ({"tasks": ["piqa", "piqa"]}, "tasks"),
        ({"limit": 0}, "limit"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_fewshot": -1}, "num_fewshot"),
        ({"max_length": 1}, "max_length"),
    ],
)
def test_zero_shot_rejects_bad_arguments(kwargs, param):
    args = {"tasks": ["dynslice_cloze"], **kwargs}
    with pytest.raises(ValueError, match=f"^{param}:"):
        ev.zero_shot(None, None, args.pop("tasks"), **args)


def test_zero_shot_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="dynslice_continuation") as info:
        ev.zero_shot(None, None, ["lambada_openai"])
    assert all(t in str(info.value) for t in ev.STANDARD_TASKS)


def test_hub_task_offline_names_the_offline_tasks(tiny_lm, smol_tokenizer):
    with pytest.raises(RuntimeError, match="dynslice_cloze, dynslice_continuation"):
        ev.zero_shot(tiny_lm, smol_tokenizer, ["piqa"], limit=2)


def test_offline_tasks_through_lm_eval_match_direct_computation(tiny_lm, smol_tokenizer):
    tasks = list(ot.OFFLINE_TASKS)
    raw = ev.lm_eval_results(tiny_lm, smol_tokenizer, tasks, limit=6, batch_size=4, log_samples=True)
    summary = ev.summarize(raw, tasks)
    assert set(summary) == {*tasks, "average"}
    for task in tasks:
        entry = summary[task]
        assert set(entry) == {"metric", "value", "stderr"} and entry["metric"] == ev.METRIC[task]
        assert 0.0 <= entry["value"] <= 1.0 and (entry["stderr"] is None or entry["stderr"] >= 0.0)
    assert summary["average"]["value"] == pytest.approx(sum(summary[t]["value"] for t in tasks) / 2)

    cont = raw["samples"]["dynslice_continuation"]
    assert len(cont) == 6
    hand_norm = []
    for sample in cont:  # by hand: log-likelihood of each choice, then argmax of ll / len(choice) as lm-eval does
        doc = sample["doc"]
        lls = [continuation_logprob(tiny_lm, smol_tokenizer, doc["context"], " " + c)[0] for c in doc["choices"]]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-3)
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        hand_norm.append(float(max(range(4), key=norm.__getitem__) == doc["label"]))
        assert sample["acc_norm"] == hand_norm[-1]
        assert sample["acc"] == float(max(range(4), key=lls.__getitem__) == doc["label"])
    assert summary["dynslice_continuation"]["value"] == pytest.approx(sum(hand_norm) / len(hand_norm))

    cloze = raw["samples"]["dynslice_cloze"]
    hand_acc = []
    for sample in cloze:  # by hand: is the target the greedy continuation?
        ll, greedy = continuation_logprob(tiny_lm, smol_tokenizer, sample["doc"]["context"], sample["doc"]["target"])
        assert sample["filtered_resps"][0][0] == pytest.approx(ll, abs=1e-3)
        hand_acc.append(float(greedy))
        assert sample["acc"] == hand_acc[-1]
    assert summary["dynslice_cloze"]["value"] == pytest.approx(sum(hand_acc) / len(hand_acc))
