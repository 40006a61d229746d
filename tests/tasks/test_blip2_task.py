"""BLIP-2 tasks on tiny shapes: stage 1 fits and evaluates (with and without the
frozen-feature cache), the causal LM trains and exports, stage 2 fits from a stage-1
checkpoint with GPT-2 and T5 LLMs and reloads strictly."""

import lightning as L
import pytest
import torch
from tiny_configs import tiny_blip2_config as tiny_config

from vlzoo.config import BLIP2LLMConfig, CausalLMConfig, EvalConfig, OptimConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.data.llm_text import shapes_lm_tokenizer
from vlzoo.families import load_task
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks import BLIP2LLMTask, BLIP2Task, CausalLMTask

OPTIM = OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.05)
GREEDY = GenerationConfig(method="greedy", max_length=6, min_length=1)


def data(batch_size: int = 16) -> VLDataModule:
    return VLDataModule(shapes=ShapesConfig(image_size=16, train_size=128, val_size=16, test_size=16),
                        batch_size=batch_size, eval_batch_size=16)


def trainer(tmp_path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
                     **kwargs)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def stage1_task(**overrides) -> BLIP2Task:
    return BLIP2Task(tiny_config(**overrides), OPTIM, EvalConfig(rerank_k=4, itm_batch_size=32), GREEDY)


@pytest.mark.parametrize(("term", "weight", "expected"), [("cosine", 1.0, 1.0), ("none", 1.0, 0.0),
                                                         ("logit", 2.0, 2.0 / 0.05)])
def test_rerank_itc_term_scales_the_first_stage(term, weight, expected):
    task = BLIP2Task(tiny_config(), OPTIM, EvalConfig(rerank_itc=term, rerank_itc_weight=weight), GREEDY)
    with torch.no_grad():
        task.model.temp.fill_(0.05)
    assert task.evaluator.rerank_itc_weight() == pytest.approx(expected)


def test_unknown_rerank_itc_term_is_refused():
    with pytest.raises(ValueError, match="eval.rerank_itc must be one of"):
        EvalConfig(rerank_itc="softmax")


def test_stage1_fit_lowers_loss_reports_metrics_and_reloads(tmp_path):
    L.seed_everything(0)
    task, recorder = stage1_task(), LossRecorder()
    fit = trainer(tmp_path, 30, callbacks=[recorder])
    fit.fit(task, datamodule=data())
    assert sum(recorder.losses[-5:]) < sum(recorder.losses[:5])
    metrics = fit.callback_metrics
    for name in ("r1_t2i", "itc_r1_t2i", "r1_i2t", "compositional_acc", "zeroshot_acc", "bleu4", "cider"):
        assert torch.isfinite(metrics[f"val/{name}"]), name
    loaded = load_task(fit.checkpoint_callback.best_model_path)
    assert isinstance(loaded, BLIP2Task)
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    captions = loaded.caption(next(iter(fit.datamodule.val_dataloader()))["pixel_values"][:2])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_frozen_feature_cache_gives_the_same_training(tmp_path):
    runs = {}
    for cached in (False, True):
        L.seed_everything(0)
        task, recorder = stage1_task(cache_image_features=cached), LossRecorder()
        trainer(tmp_path / str(cached), 2 * 128 // 16, limit_val_batches=0).fit(task, datamodule=data())
        runs[cached] = (recorder.losses, task)
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), atol=1e-4, rtol=1e-4)
    cache = runs[True][1].feature_cache
    assert cache.misses == 128 and cache.hits == 128  # second epoch read entirely from the cache


def test_the_cache_looks_up_host_ids_taken_before_the_batch_moves(tmp_path, monkeypatch):
    from vlzoo.tasks.blip2 import FrozenFeatureCache

    looked_up = []
    get = FrozenFeatureCache.get
    monkeypatch.setattr(FrozenFeatureCache, "get", lambda self, ids, *a: looked_up.append(ids) or get(self, ids, *a))
    L.seed_everything(0)
    trainer(tmp_path, 3, limit_val_batches=0).fit(stage1_task(cache_image_features=True), datamodule=data())
    assert len(looked_up) == 3 and all(isinstance(ids, list) and len(ids) == 16 for ids in looked_up)


def test_cache_refuses_random_augmentation(tmp_path):
    module = data()
    module.random_augmentation = True
    with pytest.raises(ValueError, match="random augmentation"):
        trainer(tmp_path, 2).fit(stage1_task(cache_image_features=True), datamodule=module)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny GPT-2 trained by CausalLMTask for a few steps, exported to HF form."""
    L.seed_everything(0)
    task = CausalLMTask(CausalLMConfig(kwargs=dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),
                        OptimConfig(lr=3e-3, warmup_steps=2))
    root = tmp_path_factory.mktemp("lm")
    recorder = LossRecorder()
    fit = trainer(root, 60, callbacks=[recorder])
    fit.fit(task, datamodule=data())
    assert recorder.losses[-1] < recorder.losses[0]
    assert torch.isfinite(fit.callback_metrics["val/perplexity"])
    task.export_pretrained(root / "hf")
    return root / "hf"


def test_causal_lm_export_loads_with_transformers(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_causal_lm_caption_context_reads_another_caption_of_the_image(tmp_path):
    L.seed_everything(0)
    task = CausalLMTask(CausalLMConfig(kwargs=dict(n_embd=32, n_layer=2, n_head=2, n_positions=96),
                                       caption_context=True, add_bos=False), OptimConfig(lr=3e-3, warmup_steps=2))
    recorder = LossRecorder()
    fit = trainer(tmp_path, 20, callbacks=[recorder])
    fit.fit(task, datamodule=data())
    assert recorder.losses[-1] < recorder.losses[0] and torch.isfinite(fit.callback_metrics["val/perplexity"])
    records = fit.datamodule.source("train").records
    index = list(range(8))
    targets = [records[i]["captions"][0] for i in index]
    contexts, kept = task._context_captions(index, targets)
    with_others = [i for i, t in zip(index, targets) if set(records[i]["captions"]) - {t}]
    assert kept == [records[i]["captions"][0] for i in with_others] and len(contexts) == len(kept) > 0
    for i, context, target in zip(with_others, contexts, kept):
        assert context in records[i]["captions"] and context != target  # another caption of the same image
    assert task._context_captions(index, targets) == (contexts, kept)  # the same draw at the same step
    assert task.lm_tokenizer("a red circle")["input_ids"][0] != task.lm_tokenizer.bos_token_id


def test_caption_context_refuses_a_streamed_training_source():
    from types import SimpleNamespace

    task = CausalLMTask(CausalLMConfig(kwargs=dict(n_embd=16, n_layer=1, n_head=2, n_positions=64),
                                       caption_context=True))
    stream = SimpleNamespace(name="shards/{0..9}.tar")  # a stream has no records
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(source=lambda split: stream), global_step=0)
    with pytest.raises(ValueError, match=r"caption_context.*shards/\{0\.\.9\}\.tar.*streamed"):
        task._context_captions([0], ["a red circle"])


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("stage1")
    fit = trainer(root, 10)
    fit.fit(stage1_task(), datamodule=data())
    return fit.checkpoint_callback.best_model_path


def _t5_dir(root):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = shapes_lm_tokenizer()
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_stage2_from_stage1_checkpoint_trains_evaluates_and_reloads(tmp_path, kind, lm_dir, stage1_checkpoint):
    llm = str(lm_dir) if kind == "gpt2" else str(_t5_dir(tmp_path / "t5"))
    cfg = BLIP2LLMConfig(stage1=stage1_checkpoint, llm=llm, caption_prompt="", instruction_aware=kind == "t5",
                         cache_image_features=kind == "gpt2")
    L.seed_everything(0)
    task = BLIP2LLMTask(cfg, OptimConfig(lr=5e-3, warmup_steps=2), EvalConfig(itm_batch_size=64), GREEDY, GREEDY)
    stage1 = load_task(stage1_checkpoint)
    torch.testing.assert_close(task.model.qformer.query_tokens, stage1.model.qformer.query_tokens)
    llm_before = {k: v.clone() for k, v in task.model.llm.state_dict().items()}
    module = data(batch_size=64)
    module.attach(task.tokenizer, 16, (0.5,) * 3, (0.5,) * 3)
    module.with_qa = True
    probe = next(iter(module.train_dataloader()))  # one fixed batch, scored before and after training
    with torch.no_grad():
        before = {k: float(v) for k, v in task.losses(probe).items()}
    fit = trainer(tmp_path / "run", 32)
    fit.fit(task, datamodule=data())
    if kind == "gpt2":  # each of the 128 images is encoded once; the probe (64) and 32 steps x 16 read the cache
        assert task.feature_cache.misses == 128 and task.feature_cache.hits == 64 + 32 * 16 - 128
    with torch.no_grad():
        after = {k: float(v) for k, v in task.losses(probe).items()}
    assert set(before) == {"caption", "vqa"}
    # the VQA loss falls clearly; the caption loss of this tiny random LM barely moves in 32 steps (within +-0.1)
    assert after["vqa"] < before["vqa"] - 0.05 and sum(after.values()) < sum(before.values()), (before, after)
    assert all(torch.equal(v, llm_before[k]) for k, v in task.model.llm.state_dict().items())
    metrics = fit.callback_metrics
    for name in ("bleu4", "cider", "vqa_acc", "vqa_majority_acc"):
        assert 0.0 <= float(metrics[f"val/{name}"]) <= 10.0, name
    path = fit.checkpoint_callback.best_model_path
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.llm.") for k in saved["state_dict"])  # reloaded from cfg.llm instead
    assert saved["hyper_parameters"]["model"]["stage1"] is None  # no dependency on the stage-1 artefact
    loaded = load_task(path)
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    images = next(iter(fit.datamodule.val_dataloader()))["pixel_values"][:2]
    assert len(loaded.caption(images)) == 2 and len(loaded.vqa(images, ["how many shapes are there?"] * 2)) == 2


def test_cli_written_stage1_checkpoint_reloads(tmp_path):
    """LightningCLI records hyper-parameters its own way: the checkpoint still loads."""
    from vlzoo.cli import main

    config = tmp_path / "stage1.yaml"
    config.write_text(f"""
trainer: {{max_steps: 4, val_check_interval: 4, check_val_every_n_epoch: null, num_sanity_val_steps: 0,
          enable_progress_bar: false, logger: false, default_root_dir: {tmp_path / "run"}}}
model:
  class_path: vlzoo.tasks.BLIP2Task
  init_args:
    model:
      embed_dim: 16
      num_queries: 4
      vision: {{impl: timm, name: vit_tiny_patch16_224, image_size: 16, output_layer: -2,
               kwargs: {{patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}}}
      qformer: {{impl: bert, tokenizer: shapes, context_length: 24, pooling: mean,
                kwargs: {{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,
                         max_position_embeddings: 32}}}}
    eval: {{rerank_k: 4}}
    generation: {{method: greedy, max_length: 4, min_length: 1}}
data: {{batch_size: 16, eval_batch_size: 16, shapes: {{image_size: 16, train_size: 64, val_size: 16, test_size: 16}}}}
""")
    assert main(["fit", "--config", str(config)]) == 0
    loaded = load_task(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, BLIP2Task) and loaded.config.qformer.tokenizer == "shapes"
    assert loaded.config.qformer.pooling == "mean" and loaded.model.qformer.num_queries == 4
