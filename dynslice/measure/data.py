"""Named text datasets as documents, token streams, calibration batches and evaluation chunks.

Two kinds of dataset:

- **hub** (:data:`ONLINE_DATASETS`), loaded with ``datasets`` from the Hugging Face hub: ``wikitext2``, ``ptb``,
  ``c4`` and ``alpaca`` exactly as SliceGPT uses them, and ``pg19``, on which the paper computes Layer
  Redundancy. :data:`HUB_SOURCES` records where each lives and which field holds its text. With
  ``DYNSLICE_HUB_MIRROR`` set, the same calls read a local copy in the hub's format (:mod:`dynslice.measure.mirror`).
- **offline** (:data:`OFFLINE_DATASETS`), built from text files inside the ``gensim`` wheel, so they work with no
  network: ``wiki`` (a real English Wikipedia dump, cleaned to prose) and ``news`` (Lee's corpus of Australian
  news articles). Both are split by article into train/validation/test, deterministically.

Every split is a list of documents; :func:`token_stream` joins them with ``"\\n\\n"`` and tokenises the whole
text once (SliceGPT's recipe), caching the ids under ``cache_dir()/tokens``. The samplers cut that stream:

- :func:`calibration_batch`: seeded random windows of the train stream (SliceGPT's calibration data);
- :func:`eval_chunks`: the split cut into consecutive non-overlapping chunks (SliceGPT's perplexity protocol);
- :func:`random_chunks`: seeded random windows of a split (the paper's perplexity protocol).

The ``reference`` protocol (:mod:`dynslice.experiment.protocol`) samples as the authors' code does instead:

- :func:`document_batch`: SliceGPT's document-joining sampler (calibration on train, perplexity on validation):
  non-empty documents joined from a seeded random start until ``seqlen`` tokens, the tokenizer's BOS first;
- :func:`sliding_window_batch`: every document cut into windows of ``length`` tokens every ``stride`` tokens
  (the authors' LR windows, short tail windows included), right-padded under mask 0.

All sampling uses ``torch.Generator().manual_seed(seed)`` and all hashing uses SHA-256, so the same arguments
give identical tensors in every process.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from dynslice.core.checks import check_choice, check_int
from dynslice.measure.mirror import hub_location, hub_mirror, mirror_fingerprint
from dynslice.store.outputs import atomic_write
from dynslice.store.paths import cache_dir, configure_hf_cache

SPLITS: tuple[str, ...] = ("train", "validation", "test")
ONLINE_DATASETS: tuple[str, ...] = ("wikitext2", "ptb", "c4", "alpaca", "pg19")
OFFLINE_DATASETS: tuple[str, ...] = ("wiki", "news")
ALL_DATASETS: tuple[str, ...] = ONLINE_DATASETS + OFFLINE_DATASETS

#: Separator between documents in a token stream (SliceGPT's).
DOC_SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------------ hub datasets
@dataclass(frozen=True)
class HubSource:
    """Where a hub dataset lives and which column holds its text.

    ``files`` pins one data file per hub split (``(hub_split, path_in_repo)`` pairs); ``max_docs`` streams the
    split and keeps only its first ``max_docs`` documents.
    """

    path: str
    text_field: str
    config: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    max_docs: int | None = None


#: Documents kept from C4 (SliceGPT subsamples it the same way): train from the first train shard; test and
#: validation are disjoint samples of the first validation shard (SliceGPT evaluates C4 on its validation split).
C4_TRAIN_DOCS = 5000
C4_EVAL_DOCS = 500
C4_SAMPLE_SEED = 0
#: PG19 books are ~100k tokens each and the train split holds 28k of them: the train and test splits are streamed
#: and only their first ``PG19_MAX_BOOKS`` books (in the dataset's order) are kept, enough for LR statistics and
#: perplexity. The validation split (50 books, the authors' LR corpus) is always kept whole.
PG19_MAX_BOOKS = 20
#: SliceGPT's split of Alpaca's single train split: 80% train, then the remaining 20% halved (seed 42 both times)
#: into test (first half) and validation (second half).
ALPACA_HOLDOUT = 0.2
ALPACA_SPLIT_SEED = 42

HUB_SOURCES: Mapping[str, HubSource] = MappingProxyType(
    {
        # Rows are lines of the articles, blank lines included, joined with "\n\n" as in SliceGPT.
        "wikitext2": HubSource("Salesforce/wikitext", "text", config="wikitext-2-raw-v1"),
        # ptb_text_only (now ptb-text-only/ptb_text_only) is a loading script, which datasets >= 4 refuses; the
        # hub's parquet export of its penn_treebank config holds the same rows.
        "ptb": HubSource(
            "ptb-text-only/ptb_text_only", "sentence", revision="refs/convert/parquet", data_dir="penn_treebank"
        ),
        "c4": HubSource(
            "allenai/c4",
            "text",
            config="en",
            files=(
                ("train", "en/c4-train.00000-of-01024.json.gz"),
                ("validation", "en/c4-validation.00000-of-00008.json.gz"),
            ),
        ),
        # "text" is the full Alpaca prompt (instruction, input and response).
        "alpaca": HubSource("tatsu-lab/alpaca", "text"),
        # deepmind/pg19 is a loading script that datasets >= 4 refuses; emozilla/pg19 is its parquet copy
        # (same books, same train/validation/test splits).
        "pg19": HubSource("emozilla/pg19", "text", max_docs=PG19_MAX_BOOKS),
    }
)

#: The column each dataset's text comes from (offline datasets are plain text).
TEXT_FIELDS: Mapping[str, str] = MappingProxyType(
    {**{name: src.text_field for name, src in HUB_SOURCES.items()}, **{name: "text" for name in OFFLINE_DATASETS}}
)

_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailableError(ValueError, RuntimeError):
    """A hub dataset was asked for while the Hugging Face hub is offline or unreachable."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for offline mode."""
    return any(os.environ.get(var, "").strip().upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_connection_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` or anything in its cause chain is a network failure."""
    names = {"ConnectError", "ConnectTimeout", "ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError) or any(cls.__name__ in names for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load_hub_split(src: HubSource, hub_split: str) -> list[str]:
    """The text column of one split of a hub dataset (streamed and truncated when ``src.max_docs`` is set), from
    the hub or from its folder in the local mirror (:mod:`dynslice.measure.mirror`)."""
    configure_hf_cache()
    import datasets
    from tqdm.auto import tqdm

    files = dict(src.files)
    kwargs: dict[str, Any] = {
        "name": src.config,
        "revision": src.revision,
        "data_dir": src.data_dir,
        "data_files": {hub_split: files[hub_split]} if files else None,
    }
    path = hub_location(src.path)  # the repository id, or its folder in $DYNSLICE_HUB_MIRROR
    if src.max_docs is None or hub_split == "validation":
        return list(datasets.load_dataset(path, split=hub_split, **kwargs)[src.text_field])
    stream = datasets.load_dataset(path, split=hub_split, streaming=True, **kwargs)
    rows = itertools.islice(stream, src.max_docs)
    return [row[src.text_field] for row in tqdm(rows, total=src.max_docs, desc=f"{src.path} {hub_split}")]


def alpaca_splits(texts: list[str]) -> dict[str, list[str]]:
    """SliceGPT's deterministic train/validation/test split of Alpaca's single train split (80/10/10)."""
    configure_hf_cache()
    import datasets

    full = datasets.Dataset.from_dict({"text": texts})
    first = full.train_test_split(test_size=ALPACA_HOLDOUT, seed=ALPACA_SPLIT_SEED)
    second = first["test"].train_test_split(test_size=0.5, seed=ALPACA_SPLIT_SEED)
    return {
        "train": list(first["train"]["text"]),
        "test": list(second["train"]["text"]),
        "validation": list(second["test"]["text"]),
    }


def c4_subset(texts: list[str], split: str) -> list[str]:
    """The C4 documents kept for ``split``: a seeded sample of the train shard, or of the validation shard for
    validation/test (test takes the first :data:`C4_EVAL_DOCS` of the permutation, validation the next ones)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(C4_SAMPLE_SEED)).tolist()
    if split == "train":
        picked = order[:C4_TRAIN_DOCS]
    elif split == "test":
        picked = order[:C4_EVAL_DOCS]
    else:
        picked = order[C4_EVAL_DOCS : 2 * C4_EVAL_DOCS]
    return [texts[i] for i in picked]


def _hub_texts(name: str, split: str) -> list[str]:
    src = HUB_SOURCES[name]
    offline = hub_offline()
    hub_mirror()  # a bad $DYNSLICE_HUB_MIRROR is its own error, before any loading
    try:
        if name == "alpaca":
            return alpaca_splits(_load_hub_split(src, "train"))[split]
        if name == "c4":
            return c4_subset(_load_hub_split(src, "train" if split == "train" else "validation"), split)
        return _load_hub_split(src, split)
    except Exception as exc:
        if not (offline or _is_connection_error(exc)):
            raise
        why = (
            "which is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
            if offline
            else f"which cannot be reached ({type(exc).__name__})"
        )
        raise HubUnavailableError(
            f"dataset: {name!r} needs the Hugging Face hub ({src.path}), {why} and the dataset is not cached; "
            f"offline datasets: {', '.join(OFFLINE_DATASETS)}"
        ) from exc


# -------------------------------------------------------------------------------------------- offline datasets
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
#: Bump when the cleaning or the split rule of the offline corpora changes (invalidates cached token streams).
OFFLINE_CORPUS_VERSION = 1
#: Share of each offline corpus (by characters) given to test and to validation; train gets the rest.
HELDOUT_SHARE = 0.1
#: A kept Wikipedia line has at least this many words; a kept article at least this many characters.
WIKI_MIN_LINE_WORDS = 8
WIKI_MIN_ARTICLE_CHARS = 500
#: Sections from which on an article is reference material, not prose.
WIKI_END_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "external links",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "footnotes",
        "citations",
        "works cited",
        "notes and references",
        "primary sources",
        "secondary sources",
    }
)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_MARKUP_START = tuple("|!{}+*#:;=")
_MARKUP_ANYWHERE = ("|", "[[", "]]", "{{", "}}", "<", "http://", "https://", "__")


def gensim_test_file(filename: str) -> Path:
    """Path of a file in ``gensim/test/test_data`` (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset: the offline datasets need the PyPI package gensim (pip install gensim)")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / filename
    if not path.is_file():
        raise FileNotFoundError(f"dataset: {path} is missing from the installed gensim package")
    return path


def clean_wiki_article(markup: str) -> str:
    """Plain prose of one article: gensim's ``filter_wiki``, then only paragraph lines are kept.

    Headings, tables, lists, captions, short lines and everything from the references sections on are dropped;
    bold/italic quotes, HTML entities and parentheses emptied by removed templates are cleaned up.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    lines: list[str] = []
    for raw in filter_wiki(markup).split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in WIKI_END_SECTIONS:
                break
            continue
        if not line or line.startswith(_MARKUP_START) or any(m in line for m in _MARKUP_ANYWHERE):
            continue
        line = html.unescape(re.sub(r"'{2,}", "", line))
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        line = re.sub(r"\s{2,}", " ", line).strip().lstrip(",;.: ")
        if len(line.split()) >= WIKI_MIN_LINE_WORDS and not line.startswith(_MARKUP_START):
            lines.append(line)
    return "\n".join(lines)


def wiki_articles() -> list[tuple[str, str]]:
    """``(title, prose)`` of the articles of gensim's Wikipedia test dump, redirects and stubs left out."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(gensim_test_file(WIKI_FILE), "rb") as f:
        pages = [(title, text) for title, text, _ in extract_pages(f)]
    articles = []
    for title, markup in pages:
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        prose = clean_wiki_article(markup)
        if len(prose) >= WIKI_MIN_ARTICLE_CHARS:
            articles.append((title, prose))
    return articles


def news_articles() -> list[str]:
    """The articles of Lee's news corpus (one per line), exact duplicates dropped, in file order."""
    seen: dict[str, None] = {}
    for line in gensim_test_file(NEWS_FILE).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            seen.setdefault(line.strip(), None)
    return list(seen)


def _stable_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def assign_splits(keys: list[str], sizes: list[int], share: float = HELDOUT_SHARE) -> list[str]:
    """The split of each item: items are visited in the order of the SHA-256 of their key; test is filled until it
    holds ``share`` of the total size, then validation likewise, and the rest is train."""
    if len(set(keys)) != len(keys):
        raise ValueError("keys: must be unique")
    total = sum(sizes)
    out = ["train"] * len(keys)
    filled = {"test": 0, "validation": 0}
    for i in sorted(range(len(keys)), key=lambda i: _stable_hash(keys[i])):
        target = next((s for s in ("test", "validation") if filled[s] < share * total), None)
        if target is None:
            break
        out[i] = target
        filled[target] += sizes[i]
    return out


def _offline_texts(name: str, split: str) -> list[str]:
    if name == "wiki":
        articles = wiki_articles()
        splits = assign_splits([title for title, _ in articles], [len(text) for _, text in articles])
        return [text for (_, text), s in zip(articles, splits) if s == split]
    docs = news_articles()
    splits = assign_splits(docs, [len(d) for d in docs])
    return [d for d, s in zip(docs, splits) if s == split]


# ------------------------------------------------------------------------------------------------- validation
def _check_source(name: str, split: str) -> None:
    """``name`` is a known dataset and ``split`` one of :data:`SPLITS`."""
    if name not in ALL_DATASETS:
        raise ValueError(
            f"dataset: {name!r} is not a known dataset; choose one of {', '.join(ALL_DATASETS)} "
            f"(offline: {', '.join(OFFLINE_DATASETS)})"
        )
    check_choice("split", split, SPLITS)


def _seeded_generator(seed: Any) -> torch.Generator:
    """A fresh generator seeded with ``seed`` (an integer with ``0 <= seed < 2**63``)."""
    return torch.Generator().manual_seed(check_int("seed", seed, 0, 2**63 - 1, allowed="0 <= seed < 2**63"))


# ------------------------------------------------------------------------------------------------- public API
def load_texts(name: str, split: str) -> list[str]:
    """The documents of ``split`` (train, validation or test) of dataset ``name``."""
    _check_source(name, split)
    return _offline_texts(name, split) if name in OFFLINE_DATASETS else _hub_texts(name, split)


def _source_identity(name: str) -> dict[str, Any]:
    """What the documents of ``name`` depend on, for the token-cache key."""
    if name in OFFLINE_DATASETS:
        raw = gensim_test_file(WIKI_FILE if name == "wiki" else NEWS_FILE).read_bytes()
        return {
            "file_sha256": hashlib.sha256(raw).hexdigest(),
            "version": OFFLINE_CORPUS_VERSION,
            "heldout_share": HELDOUT_SHARE,
        }
    extra = {"c4": [C4_TRAIN_DOCS, C4_EVAL_DOCS, C4_SAMPLE_SEED], "alpaca": [ALPACA_HOLDOUT, ALPACA_SPLIT_SEED]}
    identity = {**asdict(HUB_SOURCES[name]), "split_rule": extra.get(name)}
    mirrored = mirror_fingerprint(HUB_SOURCES[name].path)
    return identity if mirrored is None else {**identity, **mirrored}


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of everything that decides a tokenizer's output (its full definition when it has a fast backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    head = json.dumps(
        [
            type(tokenizer).__name__,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            getattr(tokenizer, "add_bos_token", None),
            getattr(tokenizer, "add_eos_token", None),
        ]
    )
    return hashlib.sha256((head + body).encode("utf-8")).hexdigest()


def token_cache_path(name: str, split: str, tokenizer) -> Path:
    """Where :func:`token_stream` caches the ids of ``name``/``split`` for ``tokenizer``."""
    who = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    key = {
        "dataset": name,
        "split": split,
        "source": _source_identity(name),
        "tokenizer": who,
        "vocab": len(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "separator": DOC_SEPARATOR,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    local = os.path.isabs(who) or os.path.exists(who)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", Path(who).name if local else who).strip("-")[:60] or "tokenizer"
    return cache_dir() / "tokens" / f"{name}-{split}-{slug}-v{len(tokenizer)}-{digest}.safetensors"


def token_stream(name: str, split: str, tokenizer) -> torch.Tensor:
    """All documents of ``name``/``split`` joined with ``"\\n\\n"`` and tokenised in one call, as a 1-D LongTensor.

    Cached under ``cache_dir()/tokens`` (see :func:`token_cache_path`); a cache hit returns the stored ids.
    """
    _check_source(name, split)
    path = token_cache_path(name, split, tokenizer)
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(path)["input_ids"]
    text = DOC_SEPARATOR.join(load_texts(name, split))
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError(f"dataset: the {split} split of {name!r} is empty")
    from safetensors.torch import save_file

    meta = {"dataset": name, "split": split, "tokenizer": str(tokenizer.name_or_path)}
    atomic_write(path, lambda tmp: save_file({"input_ids": ids}, tmp, metadata=meta))
    return ids


def _long_enough(stream: torch.Tensor, name: str, split: str, seqlen: int) -> None:
    if stream.numel() < seqlen:
        raise ValueError(
            f"seqlen: {seqlen} is longer than the {split} split of {name!r}, which has "
            f"{stream.numel()} tokens; one window needs {seqlen}"
        )


def _random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens starting at uniform random offsets, as ``(nsamples, seqlen)``."""
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)
    return stream[starts[:, None] + torch.arange(seqlen)]


def _seeded_windows(
    name: str, tokenizer, nsamples: int, seqlen: int, split: str, generator: torch.Generator
) -> torch.Tensor:
    """Validated arguments, then ``nsamples`` random ``seqlen`` windows of the split's stream."""
    _check_source(name, split)
    check_int("nsamples", nsamples, 1)
    check_int("seqlen", seqlen, 2)
    stream = token_stream(name, split, tokenizer)
    _long_enough(stream, name, split, seqlen)
    return _random_windows(stream, nsamples, seqlen, generator)


def calibration_batch(
    name: str, tokenizer, nsamples: int, seqlen: int, seed: int = 42, split: str = "train", varied_seqlen: bool = False
) -> dict[str, torch.Tensor]:
    """SliceGPT-style calibration data: ``nsamples`` seeded random ``seqlen`` windows of the ``split`` stream.

    Returns ``input_ids`` and ``attention_mask``, both ``(nsamples, seqlen)`` long. With ``varied_seqlen`` every
    odd-numbered row (1, 3, ...) keeps only its first ``L`` tokens, ``L`` drawn in ``[max(1, seqlen // 4),
    seqlen - 1]``, and is right-padded with the tokenizer's pad id (EOS when it has none) under mask 0.
    """
    generator = _seeded_generator(seed)
    ids = _seeded_windows(name, tokenizer, nsamples, seqlen, split, generator)
    mask = torch.ones_like(ids)
    if varied_seqlen:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer: has neither a pad nor an EOS token; varied_seqlen=True needs one to pad")
        for row in range(1, nsamples, 2):
            keep = int(torch.randint(max(1, seqlen // 4), seqlen, (1,), generator=generator))
            ids[row, keep:] = pad_id
            mask[row, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def eval_chunks(name: str, tokenizer, seqlen: int, split: str = "test", max_chunks: int | None = None) -> torch.Tensor:
    """SliceGPT's perplexity data: the ``split`` stream cut into consecutive ``seqlen`` chunks, the tail dropped,
    as ``(n, seqlen)`` (the first ``max_chunks`` chunks when given)."""
    _check_source(name, split)
    check_int("seqlen", seqlen, 2)
    if max_chunks is not None:
        check_int("max_chunks", max_chunks, 1)
    stream = token_stream(name, split, tokenizer)
    _long_enough(stream, name, split, seqlen)
    n = stream.numel() // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    return stream[: n * seqlen].reshape(n, seqlen).clone()


def random_chunks(
    name: str, tokenizer, nsamples: int, seqlen: int, seed: int = 42, split: str = "validation"
) -> torch.Tensor:
    """The paper's perplexity data: ``nsamples`` seeded random ``seqlen`` windows of the ``split`` stream."""
    generator = _seeded_generator(seed)
    return _seeded_windows(name, tokenizer, nsamples, seqlen, split, generator)


def heldout_chunks(
    name: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    *,
    seed: int = 42,
    cal_nsamples: int,
    cal_seqlen: int,
    split: str = "train",
) -> torch.Tensor:
    """``nsamples`` chunks of the ``split`` stream that share no token with the calibration windows that
    :func:`calibration_batch` draws for ``(cal_nsamples, cal_seqlen, seed)``: data for choosing hyper-parameters
    (the slicing base) without touching the calibration tokens or any evaluation split.

    The stream is cut into consecutive ``seqlen`` chunks; those overlapping a calibration window are dropped and
    ``nsamples`` of the rest are picked with a generator seeded by ``seed + 1``, in stream order.
    """
    _check_source(name, split)
    check_int("nsamples", nsamples, 1)
    check_int("seqlen", seqlen, 2)
    check_int("cal_nsamples", cal_nsamples, 1)
    check_int("cal_seqlen", cal_seqlen, 2)
    stream = token_stream(name, split, tokenizer)
    _long_enough(stream, name, split, max(seqlen, cal_seqlen))
    generator = torch.Generator().manual_seed(seed)
    cal_starts = torch.randint(0, stream.numel() - cal_seqlen + 1, (cal_nsamples,), generator=generator)
    used = torch.zeros(stream.numel(), dtype=torch.bool)
    for s in cal_starts.tolist():
        used[s : s + cal_seqlen] = True
    n = stream.numel() // seqlen
    free = [c for c in range(n) if not bool(used[c * seqlen : (c + 1) * seqlen].any())]
    if len(free) < nsamples:
        raise ValueError(
            f"nsamples: {nsamples} held-out chunks of {seqlen} tokens asked for, but only {len(free)} "
            f"of {name}/{split} avoid the calibration windows"
        )
    pick = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed + 1))[:nsamples].sort().values
    return torch.stack([stream[free[i] * seqlen : (free[i] + 1) * seqlen] for i in pick.tolist()])


# ------------------------------------------------------------------------------------- the reference samplers
def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text's own tokens (``[bos]`` for Llama-2/3 and Mistral, ``[]`` for
    SmolLM2)."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    if plain and len(with_special) >= len(plain) and with_special[-len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return list(with_special[: max(0, len(with_special) - len(plain))])


def join_documents(
    docs: list[str], encode, nsamples: int, seqlen: int, seed: int, prefix: list[int] | tuple[int, ...] = ()
) -> list[list[int]]:
    """SliceGPT's document-joining sampler on plain lists (the rule :func:`document_batch` applies to a dataset).

    Empty documents are dropped. Until ``nsamples`` samples exist or no document is left: draw a start position
    uniformly among the remaining documents (``torch.randint`` on a generator seeded once with ``seed``), append
    that document and the following remaining ones, joined by ``"\\n\\n"`` (each piece encoded on its own by
    ``encode``, the separator leading every piece but the first), until ``seqlen`` tokens are reached; remove the
    documents used; keep the sample only when it reached ``seqlen`` tokens. A kept sample is
    ``(prefix + tokens)[:seqlen]``: the tokenizer's BOS (when it adds one) first, the text cut to fit.
    """
    check_int("nsamples", nsamples, 1)
    check_int("seqlen", seqlen, 1)
    generator = _seeded_generator(seed)
    pool = [d for d in docs if len(d) > 0]
    out: list[list[int]] = []
    while len(out) < nsamples and pool:
        start = int(torch.randint(0, len(pool), (1,), generator=generator))
        idx, tokens = start, []
        while len(tokens) < seqlen and idx < len(pool):
            tokens += list(encode(("" if not tokens else DOC_SEPARATOR) + pool[idx]))
            idx += 1
        pool = pool[:start] + pool[idx:]
        if len(tokens) >= seqlen:
            out.append((list(prefix) + tokens[:seqlen])[:seqlen])
    return out


def document_batch(
    name: str, tokenizer, nsamples: int, seqlen: int, seed: int = 42, split: str = "train"
) -> dict[str, torch.Tensor]:
    """The authors' calibration (``split="train"``) and perplexity (``split="validation"``) samples:
    :func:`join_documents` over the documents of ``name``/``split`` with the tokenizer's own BOS, as
    ``input_ids`` and ``attention_mask`` of shape ``(n, seqlen)``, ``n <= nsamples`` (fewer when the split runs
    out of documents; an error when it yields none)."""
    _check_source(name, split)
    docs = load_texts(name, split)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    rows = join_documents(docs, encode, nsamples, seqlen, seed, special_prefix(tokenizer))
    if not rows:
        raise ValueError(f"seqlen: {seqlen} is longer than the whole {split} split of {name!r}; no sample fits")
    ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def window_starts(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the authors' LR windows over one document of ``n_tokens`` tokens: a window every
    ``stride`` tokens from 0 while ``start < n_tokens``, each ``length`` tokens or up to the document's end."""
    check_int("length", length, 1)
    check_int("stride", stride, 1)
    return [(s, min(s + length, n_tokens)) for s in range(0, n_tokens, stride)]


def evenly_spaced(total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (all of them when ``n`` is None or ``>= total``)."""
    if n is None or n >= total:
        return list(range(total))
    check_int("nsamples", n, 1)
    if n == 1:
        return [0]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def sliding_window_batch(
    name: str, tokenizer, length: int, stride: int, split: str = "validation", nsamples: int | None = None
) -> dict[str, torch.Tensor]:
    """The authors' LR data: each document of ``name``/``split`` tokenised on its own (with the tokenizer's
    special tokens), cut into :func:`window_starts` windows, right-padded to ``length`` under mask 0.

    ``nsamples`` keeps that many windows, spread evenly over all windows in document order (None: all of them,
    as the authors do).
    """
    _check_source(name, split)
    check_int("length", length, 1)
    check_int("stride", stride, 1)
    if nsamples is not None:
        check_int("nsamples", nsamples, 1)
    windows: list[list[int]] = []
    for doc in load_texts(name, split):
        ids = tokenizer(doc, verbose=False)["input_ids"]
        windows += [ids[s:e] for s, e in window_starts(len(ids), length, stride)]
    if not windows:
        raise ValueError(f"dataset: the {split} split of {name!r} holds no tokens")
    picked = [windows[i] for i in evenly_spaced(len(windows), nsamples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(picked), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, w in enumerate(picked):
        ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[row, : len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask}
