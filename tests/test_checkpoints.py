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
    with pytest.raises(FileNotFoundError, match="no complete checkpoint to resume from.*moved aside: last.ckpt.corrupt"):
        resolve_resume("last", tmp_path)  # not a silent fresh start: the run had checkpoints
    assert resolve_resume("last", tmp_path / "nothing-yet") is None  # a fresh start


def test_a_corrupt_checkpoint_is_moved_aside_not_shadowed(tmp_path, capsys):
    older = _save(tmp_path / "best-step2.ckpt", 2)
    time.sleep(0.01)
    last = _save(tmp_path / "last.ckpt", 4)
    last.write_bytes(last.read_bytes()[:100])
    assert resolve_resume("last", tmp_path) == str(older)
    assert not last.exists() and (tmp_path / "last.ckpt.corrupt").is_file()
    assert "moved to" in capsys.readouterr().out
    _save(last, 6)
    last.write_bytes(b"")  # corrupt again: a second name, nothing overwritten
    assert resolve_resume(str(last), tmp_path) == str(older)  # an explicit path falls back too
    assert (tmp_path / "last.ckpt.corrupt-2").is_file()


def _namespace(command: str, ckpt_path, root):
    from jsonargparse import Namespace

    return Namespace(subcommand=command, **{command: Namespace(ckpt_path=str(ckpt_path),
                                                               trainer=Namespace(default_root_dir=str(root)))})


def test_ckpt_path_is_checked_before_lightning_reads_it(tmp_path):
    """``vlzoo fit --ckpt_path`` of a truncated file resumes from the newest complete one;
    ``vlzoo test`` of one is a one-line error; a checkpoint naming a foreign task is refused."""
    from tiny_configs import save_task_checkpoint, tiny_task

    from vlzoo.cli import check_ckpt_path

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    good = save_task_checkpoint(tiny_task("clip"), checkpoints / "best-step2.ckpt")
    time.sleep(0.01)
    bad = checkpoints / "last.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    config = _namespace("fit", bad, tmp_path)
    check_ckpt_path(config)
    assert config.fit.ckpt_path == str(good) and (checkpoints / "last.ckpt.corrupt").is_file()
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match=f"--ckpt_path {bad}: truncated"):
        check_ckpt_path(_namespace("test", bad, tmp_path))
    foreign = torch.load(good, weights_only=False)
    foreign["vlzoo_task"] = "this.Nothing"
    torch.save(foreign, checkpoints / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a vlzoo task"):
        check_ckpt_path(_namespace("test", checkpoints / "foreign.ckpt", tmp_path))
