"""Tests of dynslice.measure.data: the offline corpora, their splits, token streams, the samplers and their errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from dynslice.measure import data

SEQLEN = 64


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def _is_window(stream: torch.Tensor, row: torch.Tensor) -> bool:
    """Whether ``row`` occurs as a contiguous window of ``stream``."""
    windows = stream.unfold(0, row.numel(), 1)
    return bool((windows == row).all(dim=1).any())


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, list[str]]]:
    return {name: {s: data.load_texts(name, s) for s in data.SPLITS} for name in data.OFFLINE_DATASETS}


# ------------------------------------------------------------------------------------------- offline corpora
def test_wiki_is_clean_prose(splits):
    docs = [d for s in data.SPLITS for d in splits["wiki"][s]]
    assert 90 <= len(docs) <= 100
    assert 2_300_000 <= sum(len(d) for d in docs) <= 2_900_000
    for doc in docs:
        assert len(doc) >= data.WIKI_MIN_ARTICLE_CHARS
        for marker in ("[[", "]]", "{{", "}}", "'''", "#REDIRECT", "<ref", "|"):
            assert marker not in doc
        for line in doc.split("\n"):
            assert not line.startswith(("|", "!", "{", "=", "*", "#")), line
            assert len(line.split()) >= data.WIKI_MIN_LINE_WORDS
    # Real articles of the dump, each once; references sections are cut.
    titles = [t for t, _ in data.wiki_articles()]
    assert {"Anarchism", "Albert Einstein", "Aristotle"} <= set(titles) and len(set(titles)) == len(titles)
    assert not any(line.strip().lower() in ("references", "external links") for d in docs for line in d.split("\n"))


def test_clean_wiki_article_strips_markup():
    markup = (
        "{{Infobox|name=X}}\n'''Foo''' ({{lang|fr|bar}}) is a [[baz|thing]] with a long enough sentence here.\n"
        '{| class="wikitable"\n| cell one || cell two\n|}\n== History ==\nShort line.\n'
        "* a bulleted list item that is rather long indeed\n"
        "It was built in the year 1900 by people &amp; friends of the town.\n"
        "== References ==\nThis reference line is long enough to pass the filter easily.\n"
    )
    assert data.clean_wiki_article(markup) == (
        "Foo is a thing with a long enough sentence here.\n"
        "It was built in the year 1900 by people & friends of the town."
    )


def test_news_articles_match_the_file(splits):
    raw = data.gensim_test_file(data.NEWS_FILE).read_text(encoding="utf-8").split("\n")
    unique = {line.strip() for line in raw if line.strip()}
    docs = [d for s in data.SPLITS for d in splits["news"][s]]
    assert len(docs) == len(unique) == 293  # 300 lines, 7 exact duplicates
    assert set(docs) == unique


@pytest.mark.parametrize("name", data.OFFLINE_DATASETS)
def test_splits_are_disjoint_and_sized(splits, name):
    parts = splits[name]
    sets = {s: set(parts[s]) for s in data.SPLITS}
    assert all(len(sets[s]) == len(parts[s]) > 0 for s in data.SPLITS)
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    total = sum(len(d) for s in data.SPLITS for d in parts[s])
    for s in ("validation", "test"):
        share = sum(len(d) for d in parts[s]) / total
        assert 0.10 <= share <= 0.16, (s, share)


def test_assign_splits_rule():
    keys = [f"doc{i}" for i in range(50)]
    sizes = [10 + i for i in range(50)]
    out = data.assign_splits(keys, sizes)
    order = sorted(range(50), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    total, filled, expected = sum(sizes), {"test": 0, "validation": 0}, {}
    for i in order:  # direct re-statement of the rule
        target = (
            "test" if filled["test"] < 0.1 * total else "validation" if filled["validation"] < 0.1 * total else "train"
        )
        expected[i] = target
        if target != "train":
            filled[target] += sizes[i]
    assert out == [expected[i] for i in range(50)]
    with pytest.raises(ValueError, match="keys"):
        data.assign_splits(["a", "a"], [1, 1])


@pytest.mark.slow  # a second Python process
def test_splits_identical_in_another_process(splits):
    code = (
        "import hashlib; from dynslice.measure import data\n"
        "for n in data.OFFLINE_DATASETS:\n"
        "    for s in data.SPLITS:\n"
        "        print(hashlib.sha256('\\x00'.join(data.load_texts(n, s)).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [_digest(splits[n][s]) for n in data.OFFLINE_DATASETS for s in data.SPLITS]


# ---------------------------------------------------------------------------------------------- hub datasets
def test_hub_sources_record_text_fields():
    assert set(data.HUB_SOURCES) == set(data.ONLINE_DATASETS)
    assert {n: data.TEXT_FIELDS[n] for n in data.ONLINE_DATASETS} == {
        "wikitext2": "text",
        "ptb": "sentence",
        "c4": "text",
        "alpaca": "text",
        "pg19": "text",
    }
    assert dict(data.HUB_SOURCES["c4"].files) == {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    assert data.HUB_SOURCES["pg19"].max_docs == data.PG19_MAX_BOOKS


def test_alpaca_splits_follow_slicegpt():
    import datasets

    texts = [f"example {i}" for i in range(1000)]
    parts = data.alpaca_splits(texts)
    assert [len(parts[s]) for s in data.SPLITS] == [800, 100, 100]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == sorted(texts)
    # The same two calls of datasets' train_test_split, made directly.
    first = datasets.Dataset.from_dict({"text": texts}).train_test_split(test_size=0.2, seed=42)
    second = first["test"].train_test_split(test_size=0.5, seed=42)
    assert parts["train"] == list(first["train"]["text"])
    assert parts["test"] == list(second["train"]["text"]) and parts["validation"] == list(second["test"]["text"])


def test_c4_subset_is_seeded_and_disjoint():
    texts = [f"doc {i}" for i in range(3000)]
    train, val, test = (data.c4_subset(texts, s) for s in data.SPLITS)
    assert len(val) == len(test) == data.C4_EVAL_DOCS and not set(val) & set(test)
    assert len(train) == min(data.C4_TRAIN_DOCS, 3000) and set(train) == set(texts)
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(data.C4_SAMPLE_SEED)).tolist()
    assert test == [texts[i] for i in perm[:500]] and val == [texts[i] for i in perm[500:1000]]


@pytest.mark.parametrize("name", data.ONLINE_DATASETS)
def test_hub_dataset_offline_names_offline_datasets(monkeypatch, name):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        data.HubUnavailableError,
        match=rf"^dataset: '{name}' needs the Hugging Face hub.*"
        r"offline datasets: wiki, news",
    ):
        data.load_texts(name, "test")
    assert issubclass(data.HubUnavailableError, ValueError) and issubclass(data.HubUnavailableError, RuntimeError)


# ------------------------------------------------------------------------------------------------ token streams
def test_token_stream_equals_direct_tokenization(smol_tokenizer, splits):
    stream = data.token_stream("news", "test", smol_tokenizer)
    assert stream.dim() == 1 and stream.dtype == torch.long
    direct = smol_tokenizer("\n\n".join(splits["news"]["test"]))["input_ids"]
    assert stream.tolist() == direct


def test_wiki_heldout_splits_have_enough_tokens(smol_tokenizer):
    counts = {s: data.token_stream("wiki", s, smol_tokenizer).numel() for s in data.SPLITS}
    assert counts["validation"] >= 40_000 and counts["test"] >= 40_000
    assert counts["train"] > 5 * counts["test"]


def test_token_cache_hit_returns_identical_tensor(smol_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("DYNSLICE_CACHE", str(tmp_path))
    path = data.token_cache_path("news", "validation", smol_tokenizer)
    assert path.parent == tmp_path / "tokens" and "news-validation" in path.name and "v49152" in path.name
    assert not path.exists()
    first = data.token_stream("news", "validation", smol_tokenizer)
    assert path.is_file() and list((tmp_path / "tokens").iterdir()) == [path]
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["input_ids"], first)
    mtime = path.stat().st_mtime_ns
    second = data.token_stream("news", "validation", smol_tokenizer)
    assert torch.equal(first, second) and second.dtype == torch.long
    assert path.stat().st_mtime_ns == mtime
    assert data.token_cache_path("news", "test", smol_tokenizer) != path


# ---------------------------------------------------------------------------------------------------- samplers
def test_calibration_batch_windows_and_determinism(smol_tokenizer):
    batch = data.calibration_batch("news", smol_tokenizer, nsamples=6, seqlen=SEQLEN, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (6, SEQLEN) and ids.dtype == mask.dtype == torch.long
    assert bool((mask == 1).all())
    stream = data.token_stream("news", "train", smol_tokenizer)
    assert all(_is_window(stream, row) for row in ids)
    again = data.calibration_batch("news", smol_tokenizer, nsamples=6, seqlen=SEQLEN, seed=3)
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["attention_mask"], mask)
    other = data.calibration_batch("news", smol_tokenizer, nsamples=6, seqlen=SEQLEN, seed=4)
    assert not torch.equal(other["input_ids"], ids)
    # The windows are drawn as documented: uniform starts from torch.Generator().manual_seed(seed).
    starts = torch.randint(0, stream.numel() - SEQLEN + 1, (6,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, torch.stack([stream[s : s + SEQLEN] for s in starts.tolist()]))


def test_calibration_batch_varied_seqlen_pads_under_mask(smol_tokenizer):
    n = 7
    plain = data.calibration_batch("news", smol_tokenizer, nsamples=n, seqlen=SEQLEN, seed=11)["input_ids"]
    batch = data.calibration_batch("news", smol_tokenizer, nsamples=n, seqlen=SEQLEN, seed=11, varied_seqlen=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (n, SEQLEN) and ids.dtype == mask.dtype == torch.long
    pad = smol_tokenizer.pad_token_id
    lengths = mask.sum(dim=1)
    for row in range(n):
        keep = int(lengths[row])
        assert bool((mask[row, :keep] == 1).all()) and bool((mask[row, keep:] == 0).all())
        assert torch.equal(ids[row, :keep], plain[row, :keep])
        assert bool((ids[row, keep:] == pad).all())
        if row % 2 == 0:
            assert keep == SEQLEN
        else:
            assert max(1, SEQLEN // 4) <= keep < SEQLEN
    # Every token that differs from the plain window is masked, and every masked token is the pad.
    assert bool(((ids != plain) <= (mask == 0)).all()) and bool((ids[mask == 0] == pad).all())
    assert 0 < int((mask == 0).sum()) and torch.equal(ids[mask == 1], plain[mask == 1])


def test_eval_chunks_is_the_stream_reshaped(smol_tokenizer):
    stream = data.token_stream("news", "test", smol_tokenizer)
    chunks = data.eval_chunks("news", smol_tokenizer, SEQLEN)
    n = stream.numel() // SEQLEN
    assert chunks.shape == (n, SEQLEN) and chunks.dtype == torch.long
    assert torch.equal(chunks, stream[: n * SEQLEN].view(n, SEQLEN))
    assert torch.equal(data.eval_chunks("news", smol_tokenizer, SEQLEN, max_chunks=3), chunks[:3])
    assert torch.equal(data.eval_chunks("news", smol_tokenizer, SEQLEN, max_chunks=10**6), chunks)


def test_random_chunks(smol_tokenizer):
    chunks = data.random_chunks("news", smol_tokenizer, nsamples=5, seqlen=SEQLEN, seed=0)
    assert chunks.shape == (5, SEQLEN) and chunks.dtype == torch.long
    stream = data.token_stream("news", "validation", smol_tokenizer)
    assert all(_is_window(stream, row) for row in chunks)
    assert torch.equal(chunks, data.random_chunks("news", smol_tokenizer, 5, SEQLEN, seed=0, split="validation"))
    assert not torch.equal(chunks, data.random_chunks("news", smol_tokenizer, 5, SEQLEN, seed=1))


# ------------------------------------------------------------------------------------------------------ errors
def test_bad_names_and_splits():
    with pytest.raises(
        ValueError,
        match=r"^dataset: 'wikitext' is not a known dataset; choose one of "
        r"wikitext2, ptb, c4, alpaca, pg19, wiki, news",
    ):
        data.load_texts("wikitext", "test")
    with pytest.raises(ValueError, match=r"^split: 'dev' is not one of train, validation, test"):
        data.load_texts("wiki", "dev")


def test_bad_sampler_arguments(smol_tokenizer):
    cases = [
        (lambda: data.calibration_batch("news", smol_tokenizer, 0, SEQLEN), r"^nsamples: 0 is outside nsamples >= 1"),
        (lambda: data.calibration_batch("news", smol_tokenizer, 2, 1), r"^seqlen: 1 is outside seqlen >= 2"),
        (lambda: data.calibration_batch("news", smol_tokenizer, True, SEQLEN), r"^nsamples: True"),
        (lambda: data.random_chunks("news", smol_tokenizer, 2, SEQLEN, split="val"), r"^split: 'val'"),
        (lambda: data.eval_chunks("news", smol_tokenizer, SEQLEN, max_chunks=0), r"^max_chunks: 0 is outside"),
        (lambda: data.eval_chunks("nope", smol_tokenizer, SEQLEN), r"^dataset: 'nope'"),
        (
            lambda: data.random_chunks("news", smol_tokenizer, 2, SEQLEN, seed=-1),
            r"^seed: -1 is outside 0 <= seed < 2\*\*63$",
        ),
        (
            lambda: data.calibration_batch("news", smol_tokenizer, 2, SEQLEN, seed=1.5),
            r"^seed: 1.5 is not an integer; allowed: 0 <= seed < 2\*\*63$",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_too_short_stream_says_how_many_tokens(smol_tokenizer):
    have = data.token_stream("news", "test", smol_tokenizer).numel()
    for call in (
        lambda: data.eval_chunks("news", smol_tokenizer, have + 1),
        lambda: data.random_chunks("news", smol_tokenizer, 1, have + 1, split="test"),
        lambda: data.calibration_batch("news", smol_tokenizer, 1, have + 1, split="test"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"^seqlen: {have + 1} is longer than the test split of 'news', "
            rf"which has {have} tokens; one window needs {have + 1}",
        ):
            call()
    # Exactly the stream's length is enough: one window, the whole stream.
    assert torch.equal(
        data.random_chunks("news", smol_tokenizer, 2, have, split="test")[1],
        data.token_stream("news", "test", smol_tokenizer),
    )


def test_heldout_chunks_avoid_calibration_windows(smol_tokenizer):
    """Held-out chunks for choosing SB share no token position with the calibration windows."""
    from dynslice.measure.data import calibration_batch, heldout_chunks, token_stream

    stream = token_stream("news", "train", smol_tokenizer)
    starts = torch.randint(0, stream.numel() - 256 + 1, (16,), generator=torch.Generator().manual_seed(3))
    cal = calibration_batch("news", smol_tokenizer, 16, 256, seed=3)
    assert torch.equal(cal["input_ids"], stream[starts[:, None] + torch.arange(256)])
    held = heldout_chunks("news", smol_tokenizer, 8, 128, seed=3, cal_nsamples=16, cal_seqlen=256)
    assert held.shape == (8, 128)
    covered = torch.zeros(stream.numel(), dtype=torch.bool)
    for s in starts.tolist():
        covered[s : s + 256] = True
    chunk_of = {tuple(stream[c * 128 : (c + 1) * 128].tolist()): c for c in range(stream.numel() // 128)}
    for row in held:
        c = chunk_of[tuple(row.tolist())]
        assert not covered[c * 128 : (c + 1) * 128].any()
    assert torch.equal(held, heldout_chunks("news", smol_tokenizer, 8, 128, seed=3, cal_nsamples=16, cal_seqlen=256))
    with pytest.raises(ValueError, match="nsamples"):
        heldout_chunks("news", smol_tokenizer, 10_000, 128, seed=3, cal_nsamples=16, cal_seqlen=256)
