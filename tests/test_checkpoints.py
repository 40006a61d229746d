"""Atomic checkpoint writes; a truncated checkpoint is detected and the previous one used."""

import os
import time

import pytest
import torch

from vlzoo.checkpoints import AtomicCheckpointIO, checkpoint_problem, resolve_resume


def _save(path, step):
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.randn(64, 64)}, path)
    return path


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path / "last.ckpt", 1)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capsys):
    older = _save(tmp_path / "best-step2.ckpt", 2)
    time.sleep(0.01)
    newer = _save(tmp_path / "last.ckpt", 4)
    assert checkpoint_problem(newer) is None
    data = newer.read_bytes()
    newer.write_bytes(data[: len(data) // 2])
    assert "truncated" in checkpoint_problem(newer)
    assert resolve_resume("last", tmp_path) == str(older)
    assert resolve_resume(str(newer), tmp_path) == str(older)
    assert "cannot resume from" in capsys.readouterr().out
    os.remove(older)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint to resume from"):
        resolve_resume("last", tmp_path)
    assert resolve_resume("last", tmp_path / "nothing-yet") is None  # a fresh start
