"""Two lm-eval tasks that run with no hub access, built from the held-out Wikipedia prose of
:mod:`dynslice.measure.data`.

- ``dynslice_cloze``: LAMBADA-style last-word prediction. A passage of consecutive sentences ends in a word that
  also occurs earlier in the passage; the model must continue the passage with exactly that word (acc = greedy
  match, as lambada's). The target keeps its leading space.
- ``dynslice_continuation``: four-way choice of the true next sentence after one or two sentences of context; the
  three distractors are sentences of similar length from *other* articles (acc and acc_norm; acc_norm headlines).

:func:`build_offline_tasks` writes the JSONL data and the task YAMLs (from the templates in ``dynslice/measure/tasks/``,
with the data file's absolute path filled in) into ``cache_dir()/tasks`` and returns that folder, the
``include_path`` for ``lm_eval.tasks.TaskManager``. Items are drawn with a seeded ``random.Random``; the same
corpus, counts and seed give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dynslice.core.checks import check_int
from dynslice.measure.data import load_texts
from dynslice.store.outputs import atomic_write
from dynslice.store.paths import cache_dir, configure_hf_cache

OFFLINE_TASKS = ("dynslice_cloze", "dynslice_continuation")
#: Headline metric of each offline task.
OFFLINE_METRIC = {"dynslice_cloze": "acc", "dynslice_continuation": "acc_norm"}
TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
N_CHOICES = 4

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then white space, then an
# upper-case letter or opening quote; unless the word before the stop is an initial or a common abbreviation.
_BOUNDARY = re.compile(r"[.!?][\"')\]]?\s+(?=[\"(]?[A-Z])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof gen col lt sgt capt gov sen rev vs etc no nos inc co corp ltd mt ft approx ca c "
    "e.g i.e u.s u.k a.d b.c fig vol ed eds jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# Clean prose: letters, digits and ordinary punctuation, no wiki markup; ASCII only where lengths must be bytes.
_CLEAN_ASCII = re.compile(r"[A-Za-z0-9 ,.;:'\"()%$&/!?-]+")
_CLEAN_TEXT = re.compile(r"[^\x00-\x1f|\[\]{}<>=*#_\\`~^@+]+")
_MARKUP = ("''", "()", "( ", " )", "(,", "(;", " ,", " .", "--", "http", "..")
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass(frozen=True)
class _Sentence:
    doc: int
    para: int
    index: int
    text: str


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences with a rule-based splitter (initials and abbreviations kept whole)."""
    text = " ".join(paragraph.split())
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()].rsplit(" ", 1)[-1].lower().lstrip("(\"'")
        if len(before) <= 1 or before in _ABBREVIATIONS or before.rstrip(".") in _ABBREVIATIONS:
            continue
        sentences.append(text[start : match.start() + len(match.group().rstrip())])
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def is_clean(sentence: str, ascii_only: bool = True) -> bool:
    """A sentence fit for the tasks: 5-60 words, 30-300 characters, starts upper-case, ends with '.', prose
    without wiki markup; with ``ascii_only`` plain ASCII too (so its character and byte lengths agree)."""
    words = sentence.split()
    pattern = _CLEAN_ASCII if ascii_only else _CLEAN_TEXT
    return (
        5 <= len(words) <= 60
        and 30 <= len(sentence) <= 300
        and sentence[0].isupper()
        and sentence.endswith(".")
        and pattern.fullmatch(sentence) is not None
        and not any(m in sentence for m in _MARKUP)
    )


def _paragraph_sentences(docs: Sequence[str]) -> list[list[_Sentence]]:
    """Every paragraph of every document as its list of sentences (clean or not, in order)."""
    paragraphs = []
    for d, doc in enumerate(docs):
        for p, para in enumerate(line for line in doc.split("\n") if line.strip()):
            paragraphs.append([_Sentence(d, p, i, s) for i, s in enumerate(split_sentences(para))])
    return paragraphs


def _cloze_candidates(
    paragraphs: list[list[_Sentence]], min_words: int = 30, max_sentences: int = 6
) -> list[dict[str, Any]]:
    """One passage per clean sentence: it and up to ``max_sentences - 1`` clean sentences before it, reaching
    back until the passage has ``min_words`` words and its last word occurs earlier in it (else no item)."""
    items = []
    for sents in paragraphs:
        first = 0
        for end, last in enumerate(sents):
            if not is_clean(last.text, ascii_only=False):
                first = end + 1
                continue
            word = last.text[:-1].rsplit(" ", 1)[-1]
            if _WORD.fullmatch(word) is None:
                continue
            start = end
            while True:
                passage = " ".join(s.text for s in sents[start : end + 1])
                context = passage[:-1].rsplit(" ", 1)[0]  # drop the final '.', then the last word
                if len(passage.split()) >= min_words and re.search(rf"\b{word}\b", context):
                    items.append(
                        {"doc": last.doc, "context": context, "target": " " + word, "text": context + " " + word}
                    )
                    break
                if start == first or end - start + 1 == max_sentences:
                    break
                start -= 1
    return items


def _continuation_candidates(paragraphs: list[list[_Sentence]]) -> list[tuple[str, _Sentence]]:
    """Non-overlapping (context, true next sentence) pairs: one or two clean sentences, then a clean ASCII one."""
    pairs = []
    for sents in paragraphs:
        i = 0
        while i + 1 < len(sents):
            if not (is_clean(sents[i].text, ascii_only=False) and is_clean(sents[i + 1].text)):
                i += 1
                continue
            j = i + 1
            if j + 1 < len(sents) and is_clean(sents[j + 1].text) and len(sents[i].text) + len(sents[j].text) <= 300:
                context, nxt = sents[i].text + " " + sents[j].text, sents[j + 1]
            else:
                context, nxt = sents[i].text, sents[j]
            pairs.append((context, nxt))
            i = nxt.index + 1
    return pairs


def make_cloze_items(docs: Sequence[str], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` cloze items ``{"id", "doc", "context", "target", "text"}`` drawn (seeded) from ``docs``;
    ``text == context + target`` and ``target`` is a space then the passage's last word."""
    candidates = _cloze_candidates(_paragraph_sentences(docs))
    check_int("n_cloze", n, 1, len(candidates), allowed=f"1 <= n_cloze <= {len(candidates)} (passages available)")
    picked = random.Random(seed).sample(candidates, n)
    return [{"id": k, **item} for k, item in enumerate(picked)]


def make_continuation_items(docs: Sequence[str], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` items ``{"id", "doc", "context", "choices", "label"}``: ``choices[label]`` is the sentence that
    follows ``context``; the other three are distinct sentences of other documents, each between 2/3 and 3/2 of
    the true sentence's length."""
    paragraphs = _paragraph_sentences(docs)
    candidates = _continuation_candidates(paragraphs)
    check_int("n_cont", n, 1, len(candidates), allowed=f"1 <= n_cont <= {len(candidates)} (contexts available)")
    pool = sorted({s.text: s.doc for para in paragraphs for s in para if is_clean(s.text)}.items())
    rng = random.Random(seed)
    items = []
    for context, true in rng.sample(candidates, n):
        lo, hi = len(true.text) * 2 / 3, len(true.text) * 3 / 2
        options = [text for text, doc in pool if doc != true.doc and lo <= len(text) <= hi]
        if len(options) < N_CHOICES - 1:
            raise ValueError(f"docs: too few sentences of other documents to draw distractors for {true.text!r}")
        choices = rng.sample(options, N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, true.text)
        items.append({"id": len(items), "doc": true.doc, "context": context, "choices": choices, "label": label})
    return items


def _write_if_changed(path: Path, content: str) -> None:
    """Write ``content`` atomically (temporary file, then rename), leaving an identical file untouched."""
    data = content.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return
    atomic_write(path, data)


def _task_yaml(name: str, data_file: Path, datasets_cache: str) -> str:
    """The template ``dynslice/measure/tasks/<name>.yaml`` with the absolute data file (and datasets cache) filled
    in."""
    template = TEMPLATE_DIR / f"{name}.yaml"
    config = yaml.safe_load(template.read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file)}, "cache_dir": datasets_cache}
    header = f"# Generated by dynslice.measure.offline_tasks.build_offline_tasks from {template.name}; do not edit.\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=False, width=120)


def build_offline_tasks(n_cloze: int = 200, n_cont: int = 400, seed: int = 0) -> Path:
    """Build (or refresh) the offline tasks from ``load_texts("wiki", "test")`` into ``cache_dir()/tasks``.

    Writes ``<task>.jsonl`` and ``<task>.yaml`` for each of :data:`OFFLINE_TASKS` and returns the folder, to be
    given to ``TaskManager(include_path=...)``. Idempotent: unchanged files are not rewritten; changed ones are
    replaced atomically. Also points the Hugging Face caches inside :func:`cache_dir` (the YAML pins the
    ``datasets`` cache lm-eval's json loader writes to).
    """
    check_int("seed", seed)
    configure_hf_cache()
    docs = load_texts("wiki", "test")
    items = {
        "dynslice_cloze": make_cloze_items(docs, n_cloze, seed),
        "dynslice_continuation": make_continuation_items(docs, n_cont, seed + 1),
    }
    out = cache_dir() / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    datasets_cache = os.environ["HF_DATASETS_CACHE"]
    for name in OFFLINE_TASKS:
        data_file = (out / f"{name}.jsonl").resolve()
        _write_if_changed(
            data_file, "".join(json.dumps(item, ensure_ascii=True, sort_keys=True) + "\n" for item in items[name])
        )
        _write_if_changed(out / f"{name}.yaml", _task_yaml(name, data_file, datasets_cache))
    return out
