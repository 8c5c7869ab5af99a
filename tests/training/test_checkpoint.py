"""Checkpoint folders: atomic, pruned, found again."""

from __future__ import annotations

import pytest

from trainer.training.checkpoint import STATE_FILE, list_checkpoints, resolve_resume, write_checkpoint


def _write(run_dir, step, keep=None, fail=False):
    def files(folder):
        (folder / "lora.safetensors").write_bytes(b"weights")
        if fail:
            raise RuntimeError("disk full")

    return write_checkpoint(run_dir, step, files, {"step": step}, keep)


def test_checkpoints_are_listed_in_order_and_pruned(tmp_path):
    for step in (5, 10, 15, 20):
        _write(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    _write(tmp_path, 5)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, 10, fail=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "checkpoint-5"]


def test_resume_finds_the_latest_complete_checkpoint(tmp_path):
    _write(tmp_path, 5)
    latest = _write(tmp_path, 10)
    incomplete = tmp_path / "checkpoints" / "checkpoint-15"
    incomplete.mkdir()
    assert resolve_resume(str(tmp_path)) == latest
    assert resolve_resume(str(latest)) == latest
    with pytest.raises(ValueError, match="is an incomplete checkpoint"):
        resolve_resume(str(incomplete))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a run folder"):
        resolve_resume(str(empty))
    assert (latest / STATE_FILE).is_file()
