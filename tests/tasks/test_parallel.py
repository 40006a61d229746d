"""One Lightning Trainer, every family, on 2 CPU processes (gloo): DDP and FSDP2
(ModelParallelStrategy) give the gradients of one process on the union batch, step
after step (EMA copies, queues and temperature included), and the same evaluation
(retrieval, captioning, VQA) on the sharded model.

Each run is ``tests/parallel_fit.py``, one subprocess per rank started together with the
environment Lightning's launcher gives its children (``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_PORT``): Lightning then launches nothing, as under torchrun, and the ranks
import at the same time instead of one after the other (about 9 s a run). Hard negatives
and MLM masks are made deterministic there, so the split and the union batch draw the
same ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlzoo.checkpoints import checkpoint_problem, read_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "parallel_fit.py"
FAMILIES = ["clip", "albef", "blip", "blip2", "blip2_stage2"]  # blip2_stage2: a tiny random OPT
_cache: dict[tuple, dict] = {}


def run(tmp_root: Path, family: str, strategy: str, devices: int, batch: int, *extra: str) -> dict:
    """Result of ``parallel_fit.py`` (cached per session: several tests share a run)."""
    key = (family, strategy, devices, batch, extra)
    if key not in _cache:
        out = tmp_root / f"run{len(_cache)}-{family}-{strategy}-{devices}x{batch}"
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(SCRIPT), family, strategy, str(devices), str(batch), str(out), *extra]
        ranks = launch_ranks(command, devices, out)
        assert all(code == 0 for code, _ in ranks), "\n".join(f"rank {rank} (exit {code}): {log[-4000:]}"
                                                              for rank, (code, log) in enumerate(ranks))
        _cache[key] = torch.load(out / "result.pt", weights_only=True) | {"dir": out}
    return _cache[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(command: list[str], devices: int, out: Path) -> list[tuple[int, str]]:
    """Exit code and output of every rank of ``command``, all started at once (one
    process when ``devices`` is 1); when one rank fails, or after 600 s, the others are
    killed (they would wait for it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if devices > 1:
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
                "WORLD_SIZE": str(devices)}
    logs = [open(out / f"rank{rank}.log", "w+") for rank in range(devices)]
    procs = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env=env | {"LOCAL_RANK": str(rank)} if devices > 1 else env)
             for rank, log in enumerate(logs)]
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() for p in procs):
            for p in procs:
                p.kill()
        time.sleep(0.1)
    results = []
    for proc, log in zip(procs, logs, strict=True):
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


def assert_same_steps(result: dict, reference: dict) -> None:
    assert len(result["steps"]) == len(reference["steps"]) >= 2
    for step, (got, want) in enumerate(zip(result["steps"], reference["steps"], strict=True)):
        torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=1e-5, msg=f"loss of step {step}")
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name, s=step: f"step {s} gradient of {n}: {m}")


def assert_same_state(result: dict, reference: dict) -> None:
    """Weights, momentum copies, temperature; queues as sets of rows (ranks enqueue in
    rank order, which permutes the union batch)."""
    got, want = result["state"], reference["state"]
    assert got.keys() == want.keys()
    queue = {k for k in want if k.startswith("queue.")}
    for name in sorted(set(want) - queue):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    if queue:
        order_got, order_want = got["queue.index"].argsort(), want["queue.index"].argsort()
        for name in ("queue.index", "queue.image", "queue.text"):
            torch.testing.assert_close(got[name][order_got], want[name][order_want], atol=1e-5, rtol=1e-4, msg=name)
        assert int(got["queue.ptr"]) == int(want["queue.ptr"]) > 0
        assert (want["queue.index"] >= 0).any()  # the union batch was enqueued


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_equals_one_process_on_the_union_batch(root, family):
    union = run(root, family, "single", 1, 8)
    ddp = run(root, family, "ddp", 2, 4, "--validate")
    assert_same_steps(ddp, union)
    assert_same_state(ddp, union)


def assert_fsdp2_matches_ddp(fsdp: dict, ddp: dict) -> None:
    """Steps, state, evaluation metrics, and a sharded checkpoint folder."""
    assert_same_steps(fsdp, ddp)
    assert_same_state(fsdp, ddp)
    assert fsdp["metrics"].keys() == ddp["metrics"].keys() and len(ddp["metrics"]) > 3  # evaluation, captions
    for name, value in ddp["metrics"].items():
        assert abs(fsdp["metrics"][name] - value) < 1e-4, name
    checkpoint = fsdp["dir"] / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "blip"])  # blip: with checkpointing, below
def test_fsdp2_matches_ddp(root, family):
    """ModelParallelStrategy + fully_shard in configure_model: loss and gradients of DDP,
    and a sharded checkpoint folder (one file per rank plus metadata)."""
    assert_fsdp2_matches_ddp(run(root, family, "fsdp2", 2, 4, "--validate"), run(root, family, "ddp", 2, 4, "--validate"))


@pytest.mark.slow
def test_fsdp2_with_activation_checkpointing_and_plain_model_parallel_strategy(root):
    """BLIP (encoder and decoder share blocks) under FSDP2 with recomputed activations:
    DDP's steps, state and evaluation; Lightning's own ModelParallelStrategy
    (data_parallel_size=2) works too and writes one full checkpoint file."""
    reference = run(root, "blip", "ddp", 2, 4, "--validate")
    assert_fsdp2_matches_ddp(run(root, "blip", "fsdp2", 2, 4, "--checkpointing", "--validate"), reference)
    plain = run(root, "blip", "model_parallel", 2, 4)
    assert_same_steps(plain, reference)
    assert (plain["dir"] / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_fsdp2_resumes_exactly_from_a_sharded_checkpoint(root):
    """A sharded checkpoint folder after step 2 of 3, resumed for the last step: that
    step and the final state (EMA copies, queue, weights) equal the uninterrupted run."""
    whole = run(root, "albef", "fsdp2", 2, 4, "--steps", "3", "--save-at", "2")
    folder = whole["dir"] / "step2.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2
    assert not folder.with_name("step2.ckpt.partial").exists() and checkpoint_problem(folder) is None
    resumed = run(root, "albef", "fsdp2", 2, 4, "--steps", "3", "--resume", str(folder))
    assert len(resumed["steps"]) == 1
    torch.testing.assert_close(resumed["steps"][0]["loss"], whole["steps"][2]["loss"], atol=1e-6, rtol=0)
    for name, grad in whole["steps"][2]["grads"].items():
        torch.testing.assert_close(resumed["steps"][0]["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    for name, value in whole["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp2_bf16_parameters_train_close_to_fp32(root):
    """param_dtype bf16: blocks compute in bf16, master weights and reductions stay fp32."""
    bf16 = run(root, "clip", "fsdp2", 2, 4, "--param-dtype", "bf16")
    fp32 = run(root, "clip", "fsdp2", 2, 4, "--validate")
    for got, want in zip(bf16["steps"], fp32["steps"], strict=True):
        assert torch.isfinite(got["loss"]).all()
        torch.testing.assert_close(got["loss"].float(), want["loss"], atol=0.05, rtol=0.02)
    assert all(v.dtype == torch.float32 for v in bf16["state"].values() if v.is_floating_point())


@pytest.mark.slow
def test_fsdp2_keeps_frozen_bf16_parts_frozen(root):
    """BLIP-2 stage 2 with its image encoder and LLM in bf16: FSDP2 matches DDP; the
    frozen parts stay bf16, take no gradient and end equal to DDP's."""
    ddp = run(root, "blip2_stage2", "ddp", 2, 4, "--frozen-precision", "bf16")
    fsdp = run(root, "blip2_stage2", "fsdp2", 2, 4, "--frozen-precision", "bf16")
    assert_same_steps(fsdp, ddp)
    frozen = [k for k in fsdp["state"] if k.startswith(("llm.", "vision."))]
    assert frozen and all(fsdp["state"][k].dtype == torch.bfloat16 for k in frozen if fsdp["state"][k].is_floating_point())
    assert not any(k.startswith(("llm.", "vision.")) for k in fsdp["steps"][0]["grads"])
    for k in frozen:
        assert torch.equal(fsdp["state"][k], ddp["state"][k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["clip", "albef", "blip2"])
def test_classic_fsdp_on_gpus_matches_ddp(root, family):
    """Lightning's classic FSDPStrategy (GPU only) wrapping vlzoo's units; needs 2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    classic = run(root, family, "fsdp1", 2, 4, "--accelerator", "gpu")
    ddp = run(root, family, "ddp", 2, 4, "--accelerator", "gpu")
    assert_same_steps(classic, ddp)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["albef"])  # the momentum family: queues and EMA copies too
def test_ddp_resume_is_exact(root, family):
    """2 processes, 2 batches an epoch: a run stopped by max_steps after step 1 (mid-epoch)
    and resumed from the last.ckpt it left, with a larger max_steps, equals the straight
    3-step run: losses, gradients, weights, EMA copies and queues."""
    whole = run(root, family, "ddp", 2, 2, "--steps", "3")
    first = run(root, family, "ddp", 2, 2, "--steps", "1")
    last = first["dir"] / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 1
    resumed = run(root, family, "ddp", 2, 2, "--steps", "3", "--resume", str(last))
    assert len(resumed["steps"]) == 2
    for got, want in zip(resumed["steps"], whole["steps"][1:], strict=True):
        torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["index"], want["index"])  # the same samples
    for name, value in whole["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, atol=1e-6, rtol=1e-5, msg=name)
