"""Save and reload of sliced models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_batch, make_tiny_model

from dynslice.core.slicing import slice_model
from dynslice.store.io import SLICED_META, WEIGHTS, load_sliced, read_sliced_meta, save_sliced
from dynslice.store.models import load_model, resolve_spec


@pytest.fixture()
def saved(tmp_path, tiny_arch):
    model = make_tiny_model(tiny_arch, tied=True)
    batch = make_batch()
    sliced = slice_model(model, batch, [40, 24, 32], progress=False)
    out = save_sliced(sliced, tmp_path / "sliced", base_model="tiny-random", extra={"sp": 0.3})
    return sliced, out, batch


def test_reload_gives_identical_logits(saved):
    sliced, path, batch = saved
    ref = sliced(**batch).logits
    again = load_sliced(path)
    assert torch.equal(again(**batch).logits, ref)
    # a saved folder is a model spec
    assert resolve_spec(str(path)).kind == "sliced"
    assert torch.equal(load_model(str(path))(**batch).logits, ref)
    meta = read_sliced_meta(path)
    assert meta["widths"] == [40, 24, 32] and meta["base_model"] == "tiny-random" and meta["extra"] == {"sp": 0.3}
    assert meta["num_parameters"] == sum(p.numel() for p in again.parameters())


def test_no_pickle_in_the_saved_folder(saved):
    _, path, _ = saved
    names = sorted(p.name for p in path.iterdir())
    assert WEIGHTS in names and SLICED_META in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pth")) for n in names)


def test_truncated_weights_give_a_clear_error(saved):
    _, path, _ = saved
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_sliced(path)


def test_corrupted_weights_give_a_clear_error(saved):
    _, path, _ = saved
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_sliced(path)


def test_mismatched_widths_give_a_clear_error(saved):
    _, path, _ = saved
    meta = json.loads((path / SLICED_META).read_text())
    meta["widths"] = [40, 24, 24]
    (path / SLICED_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the widths"):
        load_sliced(path)


def test_saving_a_dense_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a sliced model"):
        save_sliced(make_tiny_model("llama"), tmp_path / "x", base_model="tiny")


def test_resave_replaces_atomically(tmp_path):
    model = make_tiny_model("llama")
    batch = make_batch()
    a = slice_model(copy.deepcopy(model), batch, [48, 40, 32], progress=False)
    b = slice_model(copy.deepcopy(model), batch, [32, 32, 32], progress=False)
    save_sliced(a, tmp_path / "m", "tiny")
    with pytest.raises(ValueError, match="--overwrite"):
        save_sliced(b, tmp_path / "m", "tiny")
    assert read_sliced_meta(tmp_path / "m")["widths"] == [48, 40, 32]
    save_sliced(b, tmp_path / "m", "tiny", overwrite=True)
    assert read_sliced_meta(tmp_path / "m")["widths"] == [32, 32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or backup folder left behind


def test_overwrite_never_deletes_foreign_files(tmp_path):
    """A file the user put into a model folder blocks --overwrite: replacing the folder would delete it."""
    model = make_tiny_model("llama")
    a = slice_model(copy.deepcopy(model), make_batch(), [48, 40, 32], progress=False)
    save_sliced(a, tmp_path / "m", "tiny")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        save_sliced(a, tmp_path / "m", "tiny", overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_permissions_follow_the_umask(tmp_path):
    import os
    import stat

    model = slice_model(make_tiny_model("llama"), make_batch(), [48, 40, 32], progress=False)
    old = os.umask(0o027)
    try:
        out = save_sliced(model, tmp_path / "m", "tiny")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


def test_a_killed_save_is_cleaned_up_and_never_taken_for_a_model(tmp_path):
    """A temporary folder of a dead process is refused as a model ("incomplete model") and removed by the next save
    of the same target (matched by the id and target name in its marker); a look-alike name is left alone."""
    from dynslice.store.outputs import INCOMPLETE_MARKER, TMP_PREFIX, temp_folder

    model = slice_model(make_tiny_model("llama"), make_batch(), [48, 40, 32], progress=False)
    save_sliced(model, tmp_path / "src", "tiny")
    dead = temp_folder(tmp_path / "m")
    mark = json.loads((dead / INCOMPLETE_MARKER).read_text())
    (dead / INCOMPLETE_MARKER).write_text(json.dumps({**mark, "pid": 999999999}))  # no such pid
    for p in (tmp_path / "src").iterdir():
        if p.name != SLICED_META:
            (dead / p.name).write_bytes(p.read_bytes())
    other = tmp_path / f"{TMP_PREFIX}m-final-1"  # an older dynslice's name, or another model's: not provably ours
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"only copy")
    with pytest.raises(ValueError, match="incomplete model"):
        resolve_spec(str(dead))
    half = tmp_path / "half"
    dead.rename(half)
    with pytest.raises(ValueError, match="incomplete model"):
        load_model(str(half))
    half.rename(dead)
    save_sliced(model, tmp_path / "m", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "m", "src"]
    assert (other / "model.safetensors").read_bytes() == b"only copy"


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"weights": {"file": "../other/model.safetensors"}}, "outside the model folder"),
        ({"weights": {"file": "/etc/passwd"}}, "outside the model folder"),
        ({"format_version": "1"}, "format_version"),
        ({"format_version": 0}, "format_version"),
        ({"format_version": 99}, "Upgrade dynslice"),
        ({"dtype": "float99"}, "dtype"),
        ({"weights": None}, "weights"),
        ({"widths": [40, True, 32]}, "widths"),
        ({"widths": "40"}, "widths"),
        ({"final_width": 4.5}, "final_width"),
        ({"files": ["../x"]}, "outside the model folder"),
    ],
)
def test_metadata_is_validated_against_the_schema(saved, edit, message):
    _, path, _ = saved
    meta = json.loads((path / SLICED_META).read_text())
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    (path / SLICED_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_sliced(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("π ≈ 3.14\n", "π ≈ 3.14\n".encode()),
        (b"\x00\x01raw", b"\x00\x01raw"),
        (lambda p: p.write_bytes(b"by a writer"), b"by a writer"),
    ],
)
def test_atomic_write_text_bytes_and_writer(tmp_path, content, expected):
    import os
    import stat

    from dynslice.store.outputs import atomic_write

    target = tmp_path / "new" / "sub" / "f.bin"
    old = os.umask(0o027)
    try:
        assert atomic_write(target, content) == target
    finally:
        os.umask(old)
    assert target.read_bytes() == expected
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the umask's mode, not mkstemp's owner-only 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from dynslice.store.outputs import atomic_write

    target = tmp_path / "f.txt"
    atomic_write(target, "old\n")

    def half_then_fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
