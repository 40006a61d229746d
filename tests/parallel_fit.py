"""Two optimizer steps of one family under a given strategy; records what the parallel
tests compare (run as a script: Lightning's DDP and ModelParallel launchers re-run it
once per extra process, or every rank started with LOCAL_RANK, WORLD_SIZE and MASTER_PORT
set, as tests/tasks/test_parallel.py does).

    python tests/parallel_fit.py FAMILY STRATEGY DEVICES BATCH OUT [--accumulate K] [--checkpointing] [--validate]

STRATEGY: single (one process), ddp, fsdp2 (vlzoo.parallel.FSDP2Strategy) or
model_parallel (Lightning's ModelParallelStrategy with data_parallel_size=DEVICES).
Saved on rank 0 in OUT/result.pt: per step the loss averaged over ranks and every
gradient (full tensors), and the final state dict.

The random draws that depend on how a batch is split (ITM hard negatives, MLM masks)
are replaced by deterministic ones of the same shape, so a split batch and the union
batch make the same choices; every other part of the training step is the real one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_configs

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import vlzoo.models.albef as albef_module  # noqa: E402
import vlzoo.models.itm as itm_module  # noqa: E402
from vlzoo.data.datamodule import ShapesConfig, VLDataModule  # noqa: E402
from vlzoo.distributed import is_distributed  # noqa: E402

TRAIN_SIZE = 8


def hardest_negative(similarity, positive, generator=None):
    """The most similar non-positive column of every row (no random draw)."""
    return similarity.float().masked_fill(positive, float("-inf")).argmax(1)


def fixed_mask(input_ids, attention_mask, mask_id, vocab_size, special_ids, probability=0.15, generator=None):
    """[MASK] at every third real, non-special token, chosen by token id and position."""
    special = torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    position = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    chosen = attention_mask.bool() & ~special & ((input_ids + position) % 3 == 0)
    return input_ids.masked_fill(chosen, mask_id), input_ids.masked_fill(~chosen, -100)


def tiny_opt(root: str) -> str:
    """A random tiny OPT (the frozen LLM of stage 2) with the shapes tokenizer, written once."""
    from transformers import OPTConfig, OPTForCausalLM

    from vlzoo.data.llm_text import shapes_lm_tokenizer

    path = os.path.join(root, "tiny-opt")
    if not os.path.isdir(path):  # every rank may write it: the same files, the first replace wins
        with torch.random.fork_rng():  # the model's own init draws the same whether or not this ran
            torch.manual_seed(0)
            tok = shapes_lm_tokenizer()
            llm = OPTForCausalLM(OPTConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=tok.bos_token_id, dropout=0.0,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        tmp = f"{path}.tmp{os.getpid()}"
        llm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another rank's copy is there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_task_without_dropout(family: str, root: str):
    from tiny_configs import tiny_blip2_config, tiny_task

    if family == "blip2_stage2":
        from vlzoo.config import BLIP2LLMConfig
        from vlzoo.models.generation import GenerationConfig
        from vlzoo.tasks import BLIP2LLMTask

        stage1 = tiny_blip2_config()
        greedy = GenerationConfig(method="greedy", max_length=4, min_length=1)
        frozen = os.environ.get("VLZOO_TEST_FROZEN_PRECISION")  # e.g. bf16: frozen encoder and LLM in bf16
        task = BLIP2LLMTask(BLIP2LLMConfig(vision=stage1.vision, qformer=stage1.qformer, num_queries=4,
                                           llm=tiny_opt(root), frozen_precision=frozen, llm_precision=frozen),
                            generation=greedy, vqa_generation=greedy)
    else:
        task = tiny_task(family)
    for module in task.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    return task


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Recorder(L.Callback):
    def __init__(self, save_at: int | None = None, save_path: str | None = None):
        self.steps: list[dict] = []
        self.save_at, self.save_path = save_at, save_path

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = {n: _full(p.grad).detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
        self.steps.append({"grads": grads})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone().reshape(1)
        if is_distributed():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.steps[-1]["loss"] = loss  # the last micro-batch's, averaged over ranks
        index = batch["index"]
        if is_distributed():
            parts = [torch.empty_like(index) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, index)
            index = torch.cat(parts)
        self.steps[-1]["index"] = index.sort().values
        if trainer.global_step == self.save_at:  # an interruption point (every rank takes part)
            trainer.save_checkpoint(self.save_path)


def strategy_for(name: str, devices: int, checkpointing: bool, param_dtype: str | None = None, task=None):
    if name in ("single", "ddp"):
        return "auto" if name == "single" else "ddp"
    if name == "fsdp2":
        from vlzoo.parallel import FSDP2Strategy

        return FSDP2Strategy(activation_checkpointing=checkpointing, param_dtype=param_dtype,
                             save_distributed_checkpoint=True)
    if name == "fsdp1":  # the classic strategy: Lightning allows it on GPUs only
        from lightning.pytorch.strategies import FSDPStrategy

        from vlzoo.parallel import fsdp1_wrap_policy

        return FSDPStrategy(auto_wrap_policy=fsdp1_wrap_policy(task.model), use_orig_params=True,
                            activation_checkpointing_policy=None, state_dict_type="full")
    if name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family")
    parser.add_argument("strategy")
    parser.add_argument("devices", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("out")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--resume", default=None, help="a checkpoint (file or sharded folder) to resume from")
    parser.add_argument("--param-dtype", default=None)
    parser.add_argument("--frozen-precision", default=None, help="blip2_stage2: frozen encoder and LLM dtype")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--save-at", type=int, default=None, help="also save a checkpoint after this step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.frozen_precision:  # read where the task is built, in every launched process
        os.environ["VLZOO_TEST_FROZEN_PRECISION"] = args.frozen_precision
    itm_module.sample_hard_negatives = hardest_negative
    albef_module.mask_tokens = fixed_mask
    L.seed_everything(0)
    task = tiny_task_without_dropout(args.family, os.path.dirname(os.path.abspath(args.out)))
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=TRAIN_SIZE, val_size=8, test_size=8),
                        batch_size=args.batch)
    recorder = Recorder(args.save_at, os.path.join(args.out, f"step{args.save_at}.ckpt"))
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=args.devices,
                        strategy=strategy_for(args.strategy, args.devices, args.checkpointing, args.param_dtype, task),
                        precision="32-true", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        accumulate_grad_batches=args.accumulate, default_root_dir=args.out)
    trainer.fit(task, data, ckpt_path=args.resume)
    state = {k: _full(v).detach().clone() for k, v in task.model.state_dict().items()}
    metrics = {}
    if args.validate:  # evaluation (and BLIP/BLIP-2 captioning) on the sharded model
        trainer.limit_val_batches = 1.0
        metrics = {k: float(v) for k, v in trainer.validate(task, data, verbose=False)[0].items()}
    if trainer.global_rank == 0:
        torch.save({"steps": recorder.steps, "state": state, "metrics": metrics},
                   os.path.join(args.out, "result.pt"))


if __name__ == "__main__":
    main()
