"""The paper profile's dry run on CPU: every code path of ``./run_all.sh --profile paper``, before a GPU is paid for.

Three things stand in for what only the hub has, and nothing else changes:

- **the datasets**: :func:`write_hub_mirror` writes a small copy of every hub repository the paper profile reads
  (its LR, calibration and perplexity corpora and the datasets of the six lm-eval tasks) in each repository's own
  layout, file format and column names, from the offline Wikipedia and news texts. With
  ``DYNSLICE_HUB_MIRROR`` pointing at it, dynslice and lm-eval make the same ``datasets.load_dataset`` calls with
  the folder in place of the repository id (:mod:`dynslice.measure.mirror`).
- **the model**: :func:`write_llama3_shaped_model` writes a random-init Llama with Meta-Llama-3-8B's configuration
  (GQA 4:1, intermediate 3.5x hidden, rope_theta 5e5, RMS eps 1e-5, untied head), cut to :data:`LAYERS` layers and
  its widths divided by ``width_divisor`` (all ratios and the head counts kept), as a local Hugging Face folder
  (safetensors). Llama-3's tokenizer is gated, so the folder carries SmolLM2's (vocabulary 49152, no BOS added).
- **the sizes**: :func:`dryrun_profile` loads the shipped ``paper.yaml`` and changes only the model, the sample
  sizes and the grids (one SP, a coarse SB step, a zero-shot limit); its protocol, corpora, phases and tasks are
  whatever ``paper.yaml`` holds.

Run it by hand::

    python tests/paper_dryrun.py DIR          # writes DIR/mirror, DIR/model, DIR/paper-dryrun.yaml
    DYNSLICE_HUB_MIRROR=DIR/mirror ./run_all.sh --profile DIR/paper-dryrun.yaml --root DIR/results
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import yaml

#: Meta-Llama-3-8B's configuration (its config.json), less the vocabulary (the tokenizer's here).
LLAMA3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
#: Layers kept of the 32, and the default division of every width (hidden, intermediate, head dim); see
#: :func:`write_llama3_shaped_model`.
LAYERS = 2
WIDTH_DIVISOR = 8
#: What the dry run changes in the paper profile (everything else comes from paper.yaml).
DRYRUN_BASE: dict[str, Any] = {
    "lr_seqlen": 128,  # the authors' 1024-token LR windows every 256 tokens, scaled down
    "lr_stride": 64,
    "lr_nsamples": None,  # every window of the (small) PG-19 validation split, as the paper does
    "cal_nsamples": 4,
    "cal_seqlen": 128,
    "ppl_nsamples": 4,
    "ppl_seqlen": 128,
    "batch_size": 4,
}
DRYRUN_SB_STEP = 0.15  # SB grid at the paper's first SP (0.3): 0.15 and 0.0, besides constant slicing
DRYRUN_AUTO_SB = {"step": 0.15, "nsamples": 2, "max_evals": 2}
DRYRUN_TASK_LIMIT = 1  # documents per (sub)task: mmlu's 57 subjects still run one question each

RNG_SEED = 0


# ------------------------------------------------------------------------------------------------------- texts
def _texts() -> tuple[dict[str, list[str]], list[str]]:
    """The offline Wikipedia articles per split and the news articles' paragraphs and sentences pool."""
    from dynslice.measure import data

    wiki = {split: data.load_texts("wiki", split) for split in data.SPLITS}
    return wiki, data.news_articles()


def _paragraphs(docs: list[str]) -> list[str]:
    return [p.strip() for d in docs for p in d.split("\n") if len(p.split()) >= 12]


def _sentences(docs: list[str]) -> list[str]:
    from dynslice.measure.offline_tasks import is_clean, split_sentences

    return [s for p in _paragraphs(docs) for s in split_sentences(p) if is_clean(s)]


def _parquet(path: Path, columns: dict[str, list], features=None) -> None:
    """One parquet file written by ``datasets`` (its schema metadata included, as on the hub)."""
    import datasets

    datasets.disable_progress_bars()
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def _readme(folder: Path, configs: dict[str, dict[str, str]]) -> None:
    """A dataset card whose YAML header declares the named configs and their data files, as hub repositories do."""
    header = [
        {"config_name": name, "data_files": [{"split": split, "path": pattern} for split, pattern in files.items()]}
        for name, files in configs.items()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    text = "---\n" + yaml.safe_dump({"configs": header}, sort_keys=False) + "---\n\nA dynslice dry-run mirror.\n"
    (folder / "README.md").write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------ the LM corpora
def _wikitext(root: Path, wiki: dict[str, list[str]]) -> None:
    """Salesforce/wikitext, config wikitext-2-raw-v1: one row per line (" = Title = ", paragraphs, blank lines)."""
    folder = root / "Salesforce" / "wikitext"
    config = "wikitext-2-raw-v1"
    for split, n in (("train", 12), ("validation", 3), ("test", 3)):
        rows: list[str] = []
        for k, doc in enumerate(wiki[split][:n]):
            rows += ["", f" = Article {k} = \n", ""]
            rows += [f" {p} \n" for p in doc.split("\n") if p.strip()]
        _parquet(folder / config / f"{split}-00000-of-00001.parquet", {"text": rows})
    _readme(folder, {config: {s: f"{config}/{s}-*" for s in ("test", "train", "validation")}})


def _ptb_sentence(text: str) -> str:
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return " ".join("N" if w.isdigit() else w for w in words)


def _ptb(root: Path, wiki: dict[str, list[str]]) -> None:
    """ptb-text-only/ptb_text_only, branch refs/convert/parquet: penn_treebank/<split>/0000.parquet, with the
    column ``sentence`` (lower case, numbers as N) of the hub's export."""
    folder = root / "ptb-text-only" / "ptb_text_only"
    for split, n in (("train", 1500), ("validation", 300), ("test", 300)):
        sentences = [_ptb_sentence(s) for s in _sentences(wiki[split][:20])][:n]
        _parquet(folder / "penn_treebank" / split / "0000.parquet", {"sentence": sentences})


def _c4(root: Path, paragraphs: list[str]) -> None:
    """allenai/c4, config en: en/c4-{train,validation}.0000X-of-0NNNN.json.gz, one JSON document per line with
    ``text``, ``timestamp`` and ``url``. The validation shard holds more than dynslice's 500 test documents, so that
    the validation split (the next 500 of its permutation) is not empty."""
    folder = root / "allenai" / "c4"
    shards = {
        "train": ("c4-train.00000-of-01024.json.gz", 300),
        "validation": ("c4-validation.00000-of-00008.json.gz", 560),
    }
    start = 0
    for name, n in shards.values():
        docs = paragraphs[start : start + n]
        start += n
        assert len(docs) == n, f"the offline texts have too few paragraphs for the C4 mirror ({len(docs)} < {n})"
        lines = [
            json.dumps({"text": d, "timestamp": "2019-04-25T12:00:00Z", "url": f"https://example.org/{start}/{i}"})
            for i, d in enumerate(docs)
        ]
        (folder / "en").mkdir(parents=True, exist_ok=True)
        with gzip.open(folder / "en" / name, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    _readme(folder, {"en": {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"}})


def _alpaca(root: Path, sentences: list[str], paragraphs: list[str]) -> None:
    """tatsu-lab/alpaca: one train split, data/train-*.parquet, columns instruction, input, output and text (the
    whole prompt)."""
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": [], "text": []}
    for i in range(300):
        instruction = f"Summarise the following passage in one sentence: {sentences[i]}"
        context = sentences[i + 300] if i % 2 else ""
        output = paragraphs[i]
        text = f"An instruction and a task follow. Answer it.\n\n### Instruction:\n{instruction}\n\n"
        text += (f"### Input:\n{context}\n\n" if context else "") + f"### Response:\n{output}"
        for key, value in zip(rows, (instruction, context, output, text)):
            rows[key].append(value)
    _parquet(root / "tatsu-lab" / "alpaca" / "data" / "train-00000-of-00001-dryrun.parquet", rows)


def _pg19(root: Path, wiki: dict[str, list[str]]) -> None:
    """emozilla/pg19: data/{train,validation,test}-*.parquet, one book per row with short_book_title,
    publication_date, url and text. Books here are a few thousand characters (PG-19's are ~400k)."""
    folder = root / "emozilla" / "pg19" / "data"
    for split, source, n in (("train", "train", 3), ("validation", "validation", 2), ("test", "test", 2)):
        books = [doc[:5000] for doc in wiki[source][:n]]
        _parquet(
            folder / f"{split}-00000-of-00001.parquet",
            {
                "short_book_title": [f"Book {k}" for k in range(n)],
                "publication_date": [1900 + k for k in range(n)],
                "url": [f"http://www.gutenberg.org/ebooks/{k}" for k in range(n)],
                "text": books,
            },
        )


# ------------------------------------------------------------------------------------ the lm-eval task datasets
ROWS_PER_SPLIT = 2  # rows per split of each task dataset (the dry run scores one document per task)


def _phrase(s: list[str], rng: random.Random, words: int) -> str:
    """The first ``words`` words of a random sentence: the task texts are kept short, since the 57 MMLU subjects
    times 4 choices dominate the dry run's zero-shot time."""
    return " ".join(rng.choice(s).split()[:words])


def _piqa(root: Path, s: list[str], rng: random.Random) -> None:
    """baber/piqa: goal, sol1, sol2, label (int); train and validation."""
    for split in ("train", "validation"):
        rows = {"goal": [], "sol1": [], "sol2": [], "label": []}
        for _ in range(ROWS_PER_SPLIT):
            values = (_phrase(s, rng, 10), _phrase(s, rng, 6), _phrase(s, rng, 6), rng.randrange(2))
            for key, value in zip(rows, values):
                rows[key].append(value)
        _parquet(root / "baber" / "piqa" / "data" / f"{split}-00000-of-00001.parquet", rows)


def _winogrande(root: Path, s: list[str], rng: random.Random) -> None:
    """allenai/winogrande, config winogrande_xl: sentence (with one "_"), option1, option2, answer ("1" or "2")."""
    folder = root / "allenai" / "winogrande"
    for split in ("train", "validation", "test"):
        rows = {"sentence": [], "option1": [], "option2": [], "answer": []}
        for _ in range(ROWS_PER_SPLIT):
            words = _phrase(s, rng, 12).split()
            cut = rng.randrange(1, len(words) - 1)
            options = rng.sample([w for w in rng.choice(s).split() if w.isalpha()] or ["it", "they"], 1) + [words[cut]]
            sentence = " ".join(words[:cut] + ["_"] + words[cut + 1 :])
            answer = "" if split == "test" else str(rng.randrange(1, 3))
            for key, value in zip(rows, (sentence, options[0], options[1], answer)):
                rows[key].append(value)
        _parquet(folder / "winogrande_xl" / f"{split}-00000-of-00001.parquet", rows)
    _readme(folder, {"winogrande_xl": {sp: f"winogrande_xl/{sp}-*" for sp in ("train", "validation", "test")}})


def _hellaswag(root: Path, s: list[str], rng: random.Random) -> None:
    """Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx, endings (4), source_id, split, split_type, label
    (a string)."""
    for split in ("train", "validation", "test"):
        rows: dict[str, list] = {
            k: []
            for k in (
                "ind",
                "activity_label",
                "ctx_a",
                "ctx_b",
                "ctx",
                "endings",
                "source_id",
                "split",
                "split_type",
                "label",
            )
        }
        for i in range(ROWS_PER_SPLIT):
            ctx_a, ctx_b = _phrase(s, rng, 8), _phrase(s, rng, 6)
            endings = [_phrase(s, rng, 5) for _ in range(4)]
            label = "" if split == "test" else str(rng.randrange(4))
            values = (
                i,
                "Reading",
                ctx_a,
                ctx_b.lower(),
                f"{ctx_a} {ctx_b.lower()}",
                endings,
                f"dryrun~{i}",
                split,
                "indomain",
                label,
            )
            for key, value in zip(rows, values):
                rows[key].append(value)
        _parquet(root / "Rowan" / "hellaswag" / "data" / f"{split}-00000-of-00001.parquet", rows)


def _arc(root: Path, s: list[str], rng: random.Random) -> None:
    """allenai/ai2_arc, configs ARC-Easy and ARC-Challenge: id, question, choices {text, label}, answerKey."""
    import datasets

    folder = root / "allenai" / "ai2_arc"
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": {
                "text": datasets.Sequence(datasets.Value("string")),
                "label": datasets.Sequence(datasets.Value("string")),
            },
            "answerKey": datasets.Value("string"),
        }
    )
    for config in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "validation", "test"):
            rows: dict[str, list] = {"id": [], "question": [], "choices": [], "answerKey": []}
            for i in range(ROWS_PER_SPLIT):
                labels = ["A", "B", "C", "D"]
                choices = {"text": [_phrase(s, rng, 4) for _ in labels], "label": labels}
                values = (f"{config}-{split}-{i}", _phrase(s, rng, 10), choices, rng.choice(labels))
                for key, value in zip(rows, values):
                    rows[key].append(value)
            _parquet(folder / config / f"{split}-00000-of-00001.parquet", rows, features)
    _readme(
        folder,
        {c: {sp: f"{c}/{sp}-*" for sp in ("train", "test", "validation")} for c in ("ARC-Challenge", "ARC-Easy")},
    )


def mmlu_subjects() -> list[str]:
    """The subjects (dataset configs) of lm-eval's ``mmlu`` tasks, read from lm-eval's own task YAMLs."""
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    return sorted(yaml.safe_load(p.read_text())["dataset_name"] for p in folder.glob("mmlu_*.yaml"))


def _mmlu(root: Path, s: list[str], rng: random.Random) -> None:
    """cais/mmlu, one config per subject: question, subject, choices (4), answer (a ClassLabel A-D); splits test
    and dev (the hub's validation split is left out: lm-eval's mmlu reads test, and dev for few-shot examples, and
    ``datasets`` parses the README's 57 configs on every subject's load)."""
    import datasets

    folder = root / "cais" / "mmlu"
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    subjects = mmlu_subjects()
    for subject in subjects:
        for split in ("test", "dev"):
            rows: dict[str, list] = {"question": [], "subject": [], "choices": [], "answer": []}
            for _ in range(ROWS_PER_SPLIT):
                values = (_phrase(s, rng, 10), subject, [_phrase(s, rng, 3) for _ in range(4)], rng.randrange(4))
                for key, value in zip(rows, values):
                    rows[key].append(value)
            _parquet(folder / subject / f"{split}-00000-of-00001.parquet", rows, features)
    _readme(folder, {sub: {sp: f"{sub}/{sp}-*" for sp in ("test", "dev")} for sub in subjects})


#: Every repository of the mirror (the paper profile's corpora, then its lm-eval tasks' datasets).
REPOS = (
    "Salesforce/wikitext",
    "ptb-text-only/ptb_text_only",
    "allenai/c4",
    "tatsu-lab/alpaca",
    "emozilla/pg19",
    "baber/piqa",
    "allenai/winogrande",
    "Rowan/hellaswag",
    "allenai/ai2_arc",
    "cais/mmlu",
)


def write_hub_mirror(root: str | Path, repos: tuple[str, ...] = REPOS) -> Path:
    """Write the dry run's hub mirror of ``repos`` into ``root`` (``root/<repo id>/...``) and return it.
    Deterministic: the same files every time."""
    root = Path(root)
    wiki, news = _texts()
    paragraphs = _paragraphs(news) + _paragraphs(wiki["train"])

    @functools.cache
    def sentences() -> list[str]:  # split only when a repository needs it (it takes seconds)
        return _sentences(wiki["train"]) + _sentences(news)

    writers = {
        "Salesforce/wikitext": lambda: _wikitext(root, wiki),
        "ptb-text-only/ptb_text_only": lambda: _ptb(root, wiki),
        "allenai/c4": lambda: _c4(root, paragraphs),
        "tatsu-lab/alpaca": lambda: _alpaca(root, sentences(), paragraphs[900:]),
        "emozilla/pg19": lambda: _pg19(root, wiki),
        "baber/piqa": lambda: _piqa(root, sentences(), random.Random(RNG_SEED)),
        "allenai/winogrande": lambda: _winogrande(root, sentences(), random.Random(RNG_SEED + 1)),
        "Rowan/hellaswag": lambda: _hellaswag(root, sentences(), random.Random(RNG_SEED + 2)),
        "allenai/ai2_arc": lambda: _arc(root, sentences(), random.Random(RNG_SEED + 3)),
        "cais/mmlu": lambda: _mmlu(root, sentences(), random.Random(RNG_SEED + 4)),
    }
    for repo in repos:
        if repo not in writers:
            raise ValueError(f"repos: {repo!r} is not one of {', '.join(REPOS)}")
        writers[repo]()
    return root


# -------------------------------------------------------------------------------------------------- the model
def write_llama3_shaped_model(
    folder: str | Path, *, layers: int = LAYERS, width_divisor: int = WIDTH_DIVISOR, seed: int = 0
) -> Path:
    """A random-init Llama with Meta-Llama-3-8B's configuration, ``layers`` deep and every width (hidden,
    intermediate, head dim) divided by ``width_divisor`` (1: the full 4096 width), saved in fp32 safetensors
    with SmolLM2's tokenizer, whose vocabulary sets ``vocab_size``. Returns the folder (a model spec)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynslice.store.models import EMBEDDED_DEFAULT, load_tokenizer

    folder = Path(folder)
    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    shape = dict(LLAMA3_8B)
    for key in ("hidden_size", "intermediate_size"):
        shape[key] //= width_divisor
    shape["num_hidden_layers"] = layers
    config = LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ the profile
def dryrun_profile(model: str | Path, name: str = "paper-dryrun") -> dict[str, Any]:
    """The shipped paper profile with the dry run's model (fp32 on CPU) and sizes; everything else as paper.yaml
    has it (protocol, corpora, perplexity datasets, budgets, tasks, phases)."""
    from importlib import resources

    raw = yaml.safe_load(resources.files("dynslice.experiment.profiles").joinpath("paper.yaml").read_text())
    raw["name"] = name
    raw["description"] = "the paper profile on CPU at dry-run sizes (tests/paper_dryrun.py); numbers mean nothing"
    raw["models"] = [{"spec": str(model), "dtype": "fp32", "device": "cpu"}]
    raw["base"] = {**(raw.get("base") or {}), **DRYRUN_BASE}
    raw["sp"] = raw["sp"][:1]
    raw["sb_step"] = DRYRUN_SB_STEP
    if raw.get("auto_sb"):
        raw["auto_sb"] = {**(raw["auto_sb"] if isinstance(raw["auto_sb"], dict) else {}), **DRYRUN_AUTO_SB}
    if (raw.get("zero_shot") or {}).get("tasks"):
        raw["zero_shot"] = {**raw["zero_shot"], "limit": DRYRUN_TASK_LIMIT}
    return raw


def write_dryrun(folder: str | Path, width_divisor: int = WIDTH_DIVISOR) -> dict[str, Path]:
    """The mirror, the model and the profile YAML under ``folder``: ``{"mirror", "model", "profile"}``."""
    folder = Path(folder)
    mirror = write_hub_mirror(folder / "mirror")
    model = write_llama3_shaped_model(folder / "model", width_divisor=width_divisor)
    profile = folder / "paper-dryrun.yaml"
    profile.write_text(yaml.safe_dump(dryrun_profile(model), sort_keys=False), encoding="utf-8")
    return {"mirror": mirror, "model": model, "profile": profile}


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/paper_dryrun.py DIR [WIDTH_DIVISOR]")
    for key, path in write_dryrun(sys.argv[1], *(int(a) for a in sys.argv[2:])).items():
        print(f"{key}: {path}")
