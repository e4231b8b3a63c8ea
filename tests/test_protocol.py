"""The ``reference`` protocol: its samplers against hand-built expectations, the last layer's LR after the final norm,
the embedding-mean fold, the per-sample perplexity, the config's protocol defaults and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_tiny_model

from dynslice.cli import main
from dynslice.core.lr import layer_redundancy
from dynslice.core.slicing import slice_model
from dynslice.experiment.config import PROTOCOL_SETTINGS, RunConfig, protocol_defaults
from dynslice.experiment.protocol import DEVIATIONS, deviations_markdown, differences
from dynslice.measure import data
from dynslice.measure.evaluate import perplexity


def _words(text: str) -> list[str]:
    """A word 'tokenizer' for hand-checkable samples: the document separator becomes the token '|'."""
    return text.replace(data.DOC_SEPARATOR, " | ").split()


class WordTokenizer:
    """Minimal tokenizer: ids are word numbers in ``vocab``; optionally puts BOS (id 1) first; pad id 0."""

    pad_token_id = 0
    eos_token_id = 2

    def __init__(self, bos: bool) -> None:
        self.bos = bos
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in _words(text)]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


# -------------------------------------------------------------------------------------- document-joining sampler
def test_join_documents_hand_built():
    docs = ["a", "", "b c", "d"]  # the empty row is dropped: the pool is a, "b c", d
    # seed 2 draws start 0: "a" then "b c" joined -> a | b c (4 tokens, kept); "d" alone is too short.
    assert data.join_documents(docs, _words, nsamples=5, seqlen=4, seed=2) == [["a", "|", "b", "c"]]
    # With BOS, it goes first and the text is cut to fit.
    assert data.join_documents(docs, _words, nsamples=5, seqlen=4, seed=2, prefix=["<s>"]) == [["<s>", "a", "|", "b"]]
    # seed 1 draws start 1: "b c" then "d" -> b c | d; "a" is left and dropped.
    assert data.join_documents(docs, _words, nsamples=5, seqlen=4, seed=1) == [["b", "c", "|", "d"]]
    # seed 5 draws start 2 ("d": too short, used up), then start 0 of (a, "b c") -> a | b c.
    assert data.join_documents(docs, _words, nsamples=5, seqlen=4, seed=5) == [["a", "|", "b", "c"]]
    # seed 0 draws 2 ("d"), then 1 ("b c" alone) and "a" alone: no sample reaches 4 tokens.
    assert data.join_documents(docs, _words, nsamples=5, seqlen=4, seed=0) == []
    assert data.join_documents(docs, _words, nsamples=1, seqlen=2, seed=2) == [["a", "|"]]
    # One whole document longer than seqlen: cut, never joined.
    assert data.join_documents(["x y z w v"], _words, nsamples=3, seqlen=3, seed=7, prefix=["<s>"]) == [
        ["<s>", "x", "y"]
    ]


def test_join_documents_uses_each_document_once_and_matches_global_seeding():
    docs = [f"d{i} e{i}" for i in range(20)]
    out = data.join_documents(docs, _words, nsamples=50, seqlen=5, seed=3)
    used = [t for row in out for t in row if t != "|"]
    assert all(len(row) == 5 for row in out) and len(set(used)) == len(used)
    # The authors seed the global generator (torch.manual_seed) and draw with torch.randint: the same stream.
    torch.manual_seed(3)
    first = int(torch.randint(0, 20, (1,)))
    assert out[0][0] == f"d{first}"
    assert data.join_documents(docs, _words, nsamples=50, seqlen=5, seed=3) == out


def test_document_batch_puts_bos_first(monkeypatch):
    monkeypatch.setattr(data, "load_texts", lambda name, split: ["one two three", "", "four five"])
    tok = WordTokenizer(bos=True)
    batch = data.document_batch("wiki", tok, nsamples=4, seqlen=3, seed=0)
    ids = batch["input_ids"]
    assert ids.shape[1] == 3 and bool((ids[:, 0] == 1).all()) and bool((batch["attention_mask"] == 1).all())
    assert data.special_prefix(tok) == [1] and data.special_prefix(WordTokenizer(bos=False)) == []
    with pytest.raises(ValueError, match="seqlen"):
        data.document_batch("wiki", tok, nsamples=1, seqlen=50, seed=0)


# ---------------------------------------------------------------------------------------------- LR sliding windows
def test_window_starts_hand_built():
    assert data.window_starts(10, 4, 3) == [(0, 4), (3, 7), (6, 10), (9, 10)]
    assert data.window_starts(3, 1024, 256) == [(0, 3)]
    assert data.evenly_spaced(10, 4) == [0, 3, 6, 9] and data.evenly_spaced(3, None) == [0, 1, 2]


def test_sliding_window_batch_hand_built(monkeypatch):
    monkeypatch.setattr(data, "load_texts", lambda name, split: ["a b c d e", "f g"])
    tok = WordTokenizer(bos=True)
    batch = data.sliding_window_batch("wiki", tok, length=4, stride=2, split="validation")
    a, b, c, d, e, f, g = (tok.vocab[w] for w in "abcdefg")
    # Doc 1 = [BOS a b c d e] (6 ids): windows at 0, 2, 4; doc 2 = [BOS f g] (3 ids): windows at 0 and 2 (the
    # tail window holds one token). Each document gets its own BOS; short windows are right-padded under mask 0.
    assert batch["input_ids"].tolist() == [[1, a, b, c], [b, c, d, e], [d, e, 0, 0], [1, f, g, 0], [g, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    three = data.sliding_window_batch("wiki", tok, length=4, stride=2, split="validation", nsamples=3)
    assert three["input_ids"].tolist() == [[1, a, b, c], [d, e, 0, 0], [g, 0, 0, 0]]  # windows 0, 2, 4 of 5


# ----------------------------------------------------------------------------------------------- LR last layer
def test_lr_final_norm_matches_hf_hidden_states():
    model = make_tiny_model("llama", layers=3)
    batch = make_batch(padded=False, n=3)
    raw = layer_redundancy(model, batch, progress=False)
    normed = layer_redundancy(model, batch, progress=False, last_layer="final_norm")
    hs = model(**batch, output_hidden_states=True).hidden_states
    cos_last = F.cosine_similarity(hs[-2], hs[-1], dim=-1).double().mean().item()
    assert normed.raw[-1] == pytest.approx(cos_last, abs=1e-5)
    assert normed.raw[:-1] == pytest.approx(raw.raw[:-1], abs=1e-9)
    assert abs(normed.raw[-1] - raw.raw[-1]) > 1e-3
    with pytest.raises(ValueError, match="last_layer"):
        layer_redundancy(model, batch, progress=False, last_layer="after")


# ----------------------------------------------------------------------------------------------- embedding mean
@torch.no_grad()
def test_embedding_mean_fold_equals_a_mean_subtracted_dense_model():
    model = make_tiny_model("llama", layers=2, tied=True)
    batch = make_batch(padded=False, n=4)
    ref = copy.deepcopy(model)
    ref.lm_head.weight = torch.nn.Parameter(ref.model.embed_tokens.weight.clone())  # SliceGPT unties first
    w = ref.model.embed_tokens.weight
    w.copy_(w - w.mean(dim=-1, keepdim=True))
    d = model.config.hidden_size
    sliced = slice_model(model, batch, [d, d], progress=False, embedding_mean=True)
    assert torch.allclose(sliced(**batch).logits, ref(**batch).logits, atol=1e-4)
    assert not torch.allclose(ref(**batch).logits, make_tiny_model("llama", layers=2)(**batch).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------ per-sample perplexity
@torch.no_grad()
def test_sample_reduction_is_mean_of_per_sample_means():
    model = make_tiny_model("llama", layers=2)
    ids = make_batch(padded=False, n=3)["input_ids"]
    logits = model(input_ids=ids).logits
    means = [F.cross_entropy(logits[r, :-1], ids[r, 1:]).item() for r in range(3)]
    assert perplexity(model, ids, batch_size=2, reduction="sample") == pytest.approx(math.exp(sum(means) / 3), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        perplexity(model, ids, reduction="median")


# ------------------------------------------------------------------------------------------------ config and CLI
def test_protocol_defaults_and_overrides():
    ours, ref = RunConfig(), RunConfig(protocol="reference")
    for name, (mine, theirs) in PROTOCOL_SETTINGS.items():
        assert getattr(ours, name) == mine and getattr(ref, name) == theirs
    cpu_ref = RunConfig(protocol="reference", dtype="fp32")
    diff = differences(cpu_ref.to_json())
    assert diff["name"] == "reference" and diff["overrides"] == {"dtype": {"value": "fp32", "reference": "fp16"}}
    assert set(diff["differs_from_dynslice"]) == set(PROTOCOL_SETTINGS) - {"dtype"}
    assert differences(ours.to_json())["differs_from_dynslice"] == {}
    assert RunConfig.from_json(cpu_ref.to_json()) == cpu_ref
    with pytest.raises(ValueError, match="protocol"):
        RunConfig(protocol="paper")
    with pytest.raises(ValueError, match="lr_sampler"):
        RunConfig(lr_sampler="every")
    assert protocol_defaults("reference")["round_interval"] == 1


#: Every setting of the reference protocol, as the authors' code has it (RazvanDu/DynamicSlicing at d026087; its
#: SliceGPT fork under src/slicegpt/). A change of protocol_defaults("reference") that drifts from these fails.
AUTHORS = {
    # calculate_LR.py:45: load_dataset("pg19", split="validation")
    "lr_split": "validation",
    # short_hf.py:127-134: a window every `stride` tokens from 0 while start < length, short tail windows kept
    "lr_sampler": "sliding",
    # calculate_LR.py:67-75: every document of the split, every window (no cap)
    "lr_nsamples": None,
    # calculate_LR.py:52 (MAX_SEQ_LEN = 1024) and :73 (stride=256)
    "lr_seqlen": 1024,
    "lr_stride": 256,
    # short_hf.py:76-78 compares hidden_states[i] with hidden_states[i+1]; HF's last entry is after the final norm
    "lr_last_layer": "final_norm",
    # short_hf.py:34 (torch_dtype=torch.float16) and metrics_BI.py:17-21 (no upcast, nan_to_num(nan=0.5))
    "lr_precision": "authors_fp16",
    # experiments/run_slicegpt_perplexity.py:209-217 -> src/slicegpt/data_utils.py:96-118 (documents joined)
    "cal_sampler": "documents",
    # experiments/run_slicegpt_perplexity.py:62-71: --cal-nsamples 128, --cal-max-seqlen 2048
    "cal_nsamples": 128,
    "cal_seqlen": 2048,
    # experiments/run_slicegpt_perplexity.py:208,218-225: the validation split, through the same sampler
    "ppl_protocol": "documents",
    # experiments/run_slicegpt_perplexity.py:83-89: --ppl-eval-seqlen 2048, --ppl-eval-nsamples 128
    "ppl_seqlen": 2048,
    "ppl_nsamples": 128,
    # src/slicegpt/layernorm_fusion.py:87-90: every embedding row's mean subtracted
    "embedding_mean": True,
    # src/slicegpt/rotate.py:32-37: np.round(vector_cut * D) per layer, no interval
    "rounding": "reference",
    "round_interval": 1,
    # experiments/run_slicegpt_perplexity.py:54 (--dtype default fp16)
    "dtype": "fp16",
}


def test_reference_protocol_is_the_authors_code():
    assert protocol_defaults("reference") == AUTHORS
    assert set(AUTHORS) == set(PROTOCOL_SETTINGS)
    cfg = RunConfig(protocol="reference")
    assert {k: getattr(cfg, k) for k in AUTHORS} == AUTHORS


def test_explicit_values_win_and_none_is_a_value():
    cfg = RunConfig(protocol="reference", lr_nsamples=4, cal_nsamples=8, lr_precision="fp32")
    assert (cfg.lr_nsamples, cfg.cal_nsamples, cfg.lr_precision) == (4, 8, "fp32")
    assert RunConfig(protocol="reference", ppl_nsamples=None).ppl_nsamples is None  # None: every sample
    assert RunConfig(lr_sampler="sliding", lr_stride=8, lr_nsamples=None).lr_nsamples is None
    # an earlier record (no lr_precision) keeps its identity; fp32 is left out of the identity, other values are in
    assert (
        "lr_precision" not in RunConfig().to_json()
        and RunConfig().key() == RunConfig.from_json(RunConfig().to_json()).key()
    )
    assert cfg.to_json().get("lr_precision") is None and RunConfig.from_json(cfg.to_json()) == cfg
    assert differences(cfg.to_json())["overrides"]["lr_precision"] == {"value": "fp32", "reference": "authors_fp16"}
    assert RunConfig(protocol="reference").to_json()["lr_precision"] == "authors_fp16"


def test_deviations_table_covers_every_setting():
    table = deviations_markdown()
    assert table.count("\n") == len(DEVIATIONS) + 1
    switched = " ".join(d.switch for d in DEVIATIONS)
    for name in PROTOCOL_SETTINGS:
        assert f"`{name}:" in switched, name
    assert "held-out" in deviations_markdown(short=True)


def test_cli_run_reference_protocol(tmp_path):
    out = tmp_path / "ref.json"
    argv = [
        "run",
        "--model",
        "tiny-random",
        "--protocol",
        "reference",
        "--dtype",
        "fp32",
        "--sp",
        "0.3",
        "--sb",
        "0.1",
        "--lr-nsamples",
        "3",
        "--lr-seqlen",
        "64",
        "--cal-nsamples",
        "4",
        "--cal-seqlen",
        "32",
        "--ppl",
        "wiki",
        "--ppl-seqlen",
        "32",
        "--ppl-nsamples",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["protocol"] == "reference" and rec["protocol"]["name"] == "reference"
    assert rec["protocol"]["differs_from_dynslice"]["cal_sampler"] == {"value": "documents", "dynslice": "windows"}
    assert rec["protocol"]["differs_from_dynslice"]["lr_seqlen"] == {"value": 64, "dynslice": 512}
    assert rec["protocol"]["overrides"]["dtype"] == {"value": "fp32", "reference": "fp16"}
    assert rec["lr"]["split"] == "validation" and rec["lr"]["sampler"] == "sliding" and rec["lr"]["windows"] == 3
    assert rec["lr"]["precision"] == "authors_fp16"
    assert rec["protocol"]["differs_from_dynslice"]["lr_precision"] == {"value": "authors_fp16", "dynslice": "fp32"}
    assert rec["allocation"]["rounding"] == "reference" and rec["allocation"]["round_interval"] == 1
    assert rec["ppl"]["wiki"] > 1
    import jsonschema

    schema = json.loads((Path(data.__file__).parents[1] / "schema" / "run_record.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(rec)
    assert main([*argv[:-2], "--protocol", "paper", "--out", str(out)]) == 2


def test_cli_slice_sp_reference_rounding(tmp_path):
    """`slice --sp --rounding reference --round-interval 1`: each width is round((1 - FS_i) * D), interval 1."""
    out = tmp_path / "m"
    assert (
        main(
            [
                "slice",
                "--model",
                "tiny-random",
                "--sp",
                "0.3",
                "--sb",
                "0.3",
                "--rounding",
                "reference",
                "--round-interval",
                "1",
                "--cal-nsamples",
                "2",
                "--cal-seqlen",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    meta = json.loads((out / "dynslice.json").read_text())
    alloc = meta["extra"]["allocation"]
    assert alloc["rounding"] == "reference" and alloc["widths"] == [round(0.7 * 64)] * 4 == [45] * 4


# ------------------------------------------------------------------------------------- best SB and zero-shot
def _profile(protocol: str, every_sb: bool = False):
    from dynslice.experiment import profiles

    obj = {
        "models": ["tiny-random"],
        "base": {"protocol": protocol, "ppl_datasets": ["wiki", "news"]},
        "cal_datasets": ["wiki", "news"],
        "sp": [0.3],
        "sb_step": 0.1,
        "zero_shot": {"tasks": ["dynslice_cloze"], "limit": 1000, "every_sb": every_sb},
    }
    return profiles.parse_profile(obj, "t")


def _records(profile):
    """Fake finished records of the sweep: ppl on wiki falls with SB, ppl on news rises with it."""
    from dynslice.experiment import profiles

    out = []
    for cfg in profiles.sweep_configs(profile):
        sb = 0.0 if cfg.dense else cfg.sb
        out.append({"config": cfg.to_json(), "ppl": {"wiki": 10 + sb, "news": 20 - sb}})
    return out


def test_best_sb_is_chosen_on_the_protocols_corpus():
    from dynslice.experiment import profiles

    for protocol, news_best in (("dynslice", 0.0), ("reference", 0.2)):
        best = profiles.best_dynamic(_records(_profile(protocol)))
        sbs = {key[1]: rec["config"]["sb"] for key, rec in best.items()}
        # dynslice: the first perplexity corpus (wiki, lowest at SB 0) for both; reference: each set's own
        assert sbs == {"wiki": 0.0, "news": news_best}, protocol
        zs = profiles.zero_shot_configs(_profile(protocol), _records(_profile(protocol)))
        assert sorted((c.cal_dataset, c.sb) for c in zs) == [("news", news_best), ("wiki", 0.0)]
        assert all(c.task_limit == 1000 and c.tasks == ("dynslice_cloze",) for c in zs)


def test_zero_shot_at_every_sb():
    from dynslice.experiment import profiles

    p = _profile("reference", every_sb=True)
    zs = profiles.zero_shot_configs(p, _records(p))
    assert sorted((c.cal_dataset, c.sb) for c in zs) == [
        (cal, sb) for cal in ("news", "wiki") for sb in (0.0, 0.1, 0.2)
    ]
    with pytest.raises(ValueError, match="every_sb"):
        profiles.parse_profile(
            {"models": ["m"], "cal_datasets": ["wiki"], "sp": [0.3], "zero_shot": {"every_sb": 1}}, "t"
        )
    # reference chooses each calibration set's best SB on its own perplexity, so it needs that perplexity
    with pytest.raises(ValueError, match=r"ppl_datasets: .*'news'"):
        profiles.parse_profile(
            {
                "models": ["m"],
                "base": {"protocol": "reference", "ppl_datasets": ["wiki"]},
                "cal_datasets": ["news"],
                "sp": [0.3],
            },
            "t",
        )


def test_paper_profile_is_the_authors_setup():
    from dynslice.experiment import profiles

    p = profiles.load_profile("paper")
    assert dict(p.base)["protocol"] == "reference" and "c4" in p.cal_datasets
    assert p.zero_shot_every_sb and p.task_limit == 1000
    cfg = p.base_config(p.models[0], sp=0.3, sb=0.1, cal_dataset="c4")
    assert {k: getattr(cfg, k) for k in AUTHORS} == AUTHORS
