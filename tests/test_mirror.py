"""The local hub mirror (``DYNSLICE_HUB_MIRROR``): hub datasets read from files in the hub's own format through the
same ``datasets`` calls, and lm-eval's standard tasks pointed at the mirror."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from paper_dryrun import mmlu_subjects, write_hub_mirror

from dynslice.measure import data, lm_tasks, mirror


@pytest.fixture(scope="module")
def small_mirror(tmp_path_factory) -> Path:
    """wikitext, ptb and c4: one hub repository for each way data.py calls ``load_dataset`` (a named config; a
    revision and a data_dir; a named config with pinned data files)."""
    return write_hub_mirror(
        tmp_path_factory.mktemp("mirror"), ("Salesforce/wikitext", "ptb-text-only/ptb_text_only", "allenai/c4")
    )


def test_without_a_mirror_the_repository_id_is_used(monkeypatch):
    monkeypatch.delenv(mirror.MIRROR_ENV, raising=False)
    assert mirror.hub_location("Salesforce/wikitext") == "Salesforce/wikitext"
    assert mirror.mirror_fingerprint("Salesforce/wikitext") is None


def test_a_mirror_that_is_not_a_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(mirror.MIRROR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"^DYNSLICE_HUB_MIRROR: .* is not a folder"):
        data.load_texts("wikitext2", "test")


def test_hub_loaders_read_the_mirror_in_the_hubs_format(monkeypatch, small_mirror):
    monkeypatch.setenv(mirror.MIRROR_ENV, str(small_mirror))
    wiki_file = small_mirror / "Salesforce/wikitext/wikitext-2-raw-v1/validation-00000-of-00001.parquet"
    assert data.load_texts("wikitext2", "validation") == pq.read_table(wiki_file).column("text").to_pylist()
    ptb_file = small_mirror / "ptb-text-only/ptb_text_only/penn_treebank/test/0000.parquet"
    assert data.load_texts("ptb", "test") == pq.read_table(ptb_file).column("sentence").to_pylist()
    # C4: SliceGPT's subsampling of the pinned validation shard; test and validation are disjoint
    test, validation = data.load_texts("c4", "test"), data.load_texts("c4", "validation")
    assert len(test) == data.C4_EVAL_DOCS and validation and not set(test) & set(validation)
    # a repository the mirror does not hold is still the hub's (offline here: one clear error)
    assert mirror.hub_location("tatsu-lab/alpaca") == "tatsu-lab/alpaca"
    with pytest.raises(data.HubUnavailableError, match="alpaca"):
        data.load_texts("alpaca", "test")


def test_token_cache_keys_tell_the_mirror_from_the_hub(monkeypatch, small_mirror, smol_tokenizer):
    monkeypatch.delenv(mirror.MIRROR_ENV, raising=False)
    hub = data.token_cache_path("wikitext2", "test", smol_tokenizer)
    monkeypatch.setenv(mirror.MIRROR_ENV, str(small_mirror))
    mirrored = data.token_cache_path("wikitext2", "test", smol_tokenizer)
    assert mirrored != hub
    assert mirror.mirror_fingerprint("Salesforce/wikitext")["mirror"] == str(small_mirror / "Salesforce/wikitext")


def test_standard_tasks_read_their_datasets_from_the_mirror(monkeypatch, tmp_path):
    """mmlu expands to its 57 subjects; each gets a task of the same name that includes lm-eval's own YAML and reads
    the mirrored cais/mmlu; tasks whose repository is not mirrored are left to lm-eval."""
    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    tasks = Path(lm_eval.__file__).parent / "tasks"
    index = TaskIndex.build([tasks / "mmlu" / "default", tasks / "piqa"])
    leaves, folders = lm_tasks.expand(index, ["mmlu", "piqa"])
    assert sorted(leaves) == sorted([f"mmlu_{s}" for s in mmlu_subjects()] + ["piqa"]) and len(leaves) == 58
    assert folders == sorted([tasks / "mmlu" / "default", tasks / "piqa"])
    (tmp_path / "cais" / "mmlu").mkdir(parents=True)
    monkeypatch.setenv(mirror.MIRROR_ENV, str(tmp_path))
    monkeypatch.setenv("DYNSLICE_CACHE", str(tmp_path / "cache"))
    out = mirror.mirror_task_overrides(index, leaves)
    written = sorted(p.stem for p in out.glob("*.yaml"))
    assert written == sorted(f"mmlu_{s}" for s in mmlu_subjects())  # piqa's baber/piqa is not mirrored
    override = yaml.safe_load((out / "mmlu_anatomy.yaml").read_text())
    assert override == {
        "include": str((tasks / "mmlu" / "default" / "mmlu_anatomy.yaml").resolve()),
        "task": "mmlu_anatomy",
        "dataset_path": str(tmp_path.resolve() / "cais" / "mmlu"),
    }
    monkeypatch.delenv(mirror.MIRROR_ENV)
    assert mirror.mirror_task_overrides(index, leaves) is None
