"""vlzoo.finetune (LLRD, freezing, LoRA) and ``vlzoo finetune`` end to end on tiny models."""

import json

import pytest
import torch
from tiny_configs import save_task_checkpoint, tiny_momentum_config, tiny_task

from vlzoo.cli import main
from vlzoo.config import BLIPConfig, LoRAConfig
from vlzoo.finetune import add_lora, freeze_parts, layer_scales, merge_lora

SHAPES_16 = ["--trainer.precision", "32-true", "--trainer.check_val_every_n_epoch", "null",
             "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5",
             "--data.shapes.image_size", "16", "--data.shapes.val_size", "60", "--data.shapes.test_size", "90",
             "--data.num_workers", "0", "--data.batch_size", "32"]


def test_layer_scales_decay_from_the_top_block_down():
    model = tiny_task("blip").model  # vision: 1 block; text: 2 blocks
    scales = layer_scales(model, 0.5)
    assert scales["text.encoder.layer.1.attention.self.query.weight"] == 0.5
    assert scales["text.encoder.layer.0.attention.self.query.weight"] == 0.25
    assert scales["text.embeddings.word_embeddings.weight"] == 0.125
    assert scales["vision.model.blocks.0.attn.qkv.weight"] == 0.5
    assert scales["vision.model.pos_embed"] == 0.25
    assert scales["itm_head.weight"] == 1.0 and scales["vision.model.norm.weight"] == 1.0
    assert set(layer_scales(model, 1.0).values()) == {1.0}


def test_optimizer_groups_carry_the_scaled_learning_rates():
    from vlzoo.tasks.base import parameter_groups

    model = tiny_task("clip").model
    groups = parameter_groups(model, 0.1, 1e-3, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {g["lr"] for g in groups} >= {1e-3, 5e-4, 2.5e-4}


def test_freeze_parts_and_a_clear_error_for_an_unknown_part():
    model = tiny_task("clip").model
    freeze_parts(model, ["vision"])
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    with pytest.raises(ValueError, match="its parts: .*image_projection.*vision"):
        freeze_parts(model, ["llm"])


def test_lora_trains_adapters_only_and_merges_to_the_same_function():
    torch.manual_seed(0)
    model = tiny_task("clip").model
    pixels = torch.randn(2, 3, 16, 16)
    before = model.encode_image(pixels)
    targets = add_lora(model, LoRAConfig(rank=2, parts=["vision"]))
    assert targets == ["vision.model.blocks.0.attn.qkv"]
    assert torch.allclose(model.encode_image(pixels), before, atol=1e-6)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any(n.startswith("vision.") and "lora_" not in n
                                                             for n in trainable)
    assert "image_projection.weight" in trainable  # parts without adapters keep training
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted = model.encode_image(pixels)
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert merge_lora(model) == 1
    assert "vision.model.blocks.0.attn.qkv.weight" in model.state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert torch.allclose(model.encode_image(pixels), adapted, atol=1e-5)


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    return {"clip": str(save_task_checkpoint(tiny_task("clip"), root / "clip.ckpt")),
            "blip": str(save_task_checkpoint(tiny_task("blip"), root / "blip.ckpt"))}


def finetune(model, task, out, *extra):
    assert main(["finetune", "--model", model, "--task", task, "--out", str(out), *SHAPES_16, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_classification_finetune_runs_from_a_clip_checkpoint(starts, tmp_path):
    metrics = finetune(starts["clip"], "classify", tmp_path / "cls", "--trainer.max_steps", "4",
                       "--trainer.val_check_interval", "4", "--data.shapes.train_size", "600")
    assert {"start/test/acc", "start/test/top5_acc", "test/acc", "val/acc"} <= set(metrics)
    from vlzoo.zoo import load

    model = load(tmp_path / "cls" / "checkpoints" / "last.ckpt")  # the fine-tuned CLIP as a zoo model
    assert model.family == "clip" and model.extra["classes"][0] == "red circle"


def test_zeroshot_head_predicts_as_zeroshot_classification(starts):
    from vlzoo.families import load_task
    from vlzoo.hub.loaders import load_parts
    from vlzoo.tasks import ClassifyTask

    clip = load_task(starts["clip"])
    classes = ["red circle", "blue square", "green star"]
    task = ClassifyTask(clip.config, classes=classes, finetune={"init_from": starts["clip"]})
    task.load_initial_weights(load_parts(starts["clip"]))
    pixels = torch.randn(8, 3, 16, 16)
    expected = (clip.model.encode_image(pixels) @ task.class_embeddings(classes).T).argmax(-1)
    assert torch.equal(task.predict_classes(pixels).argmax(-1), expected)
    assert torch.equal(task.model.vision.model.pos_embed, clip.model.vision.model.pos_embed)


def test_vqa_finetune_starts_from_blip_and_beats_its_start(starts, tmp_path):
    metrics = finetune(starts["blip"], "vqa", tmp_path / "vqa", "--trainer.max_steps", "60",
                       "--trainer.val_check_interval", "60", "--data.shapes.train_size", "1920",
                       "--model.init_args.optim.lr", "2e-3", "--model.init_args.optim.warmup_steps", "5",
                       "--data.shapes.test_size", "90", "--data.shapes.val_size", "30")
    print({k: v for k, v in metrics.items() if "vqa" in k})
    assert metrics["start/test/vqa_acc"] < 0.05  # a captioner's decoder does not answer yet
    assert metrics["test/vqa_acc"] >= metrics["start/test/vqa_acc"] + 0.05  # 60 steps: 0 -> 0.11 measured


def test_vqa_answer_decoder_starts_from_blips_decoder(starts):
    from vlzoo.hub.loaders import load_parts
    from vlzoo.tasks import BLIPVQATask
    from vlzoo.tasks.vqa import blip_to_vqa_state

    blip = load_parts(starts["blip"]).model
    task = BLIPVQATask(tiny_momentum_config(BLIPConfig))
    state, kept = blip_to_vqa_state(blip.state_dict(), task.model.state_dict())
    assert torch.equal(state["answer_decoder.encoder.layer.1.attention.self.query.weight"],
                       blip.decoder.layer[1].attention.self.query.weight)
    assert torch.equal(state["text.encoder.layer.0.crossattention.self.key.weight"],
                       blip.text.encoder.layer[0].crossattention.self.key.weight)
    assert all("crossattention.self.key" in k or "crossattention.self.value" in k for k in kept)  # 24 -> 32 wide


def test_lora_finetune_resumes_and_exports_merged(starts, tmp_path):
    out = tmp_path / "lora"
    lora = ["--model.init_args.finetune.lora", '{"rank": 2, "parts": ["vision"]}', "--data.shapes.train_size", "320"]
    finetune(starts["clip"], "classify", out, "--trainer.max_steps", "3", *lora)
    first = json.loads((out / "metrics.json").read_text())
    finetune(starts["clip"], "classify", out, "--trainer.max_steps", "6", "--ckpt_path", "last", *lora)  # resumed
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and any("lora_A" in k for k in state["state_dict"])
    assert first["start/test/acc"] == json.loads((out / "metrics.json").read_text())["start/test/acc"]
    from vlzoo.zoo import load

    merged = load(out / "checkpoints" / "last.ckpt")  # adapters folded into plain weights
    assert not any("lora_" in k or "base_layer" in k for k in merged.model.state_dict())
    assert "vision.model.blocks.0.attn.qkv.weight" in merged.model.state_dict()
    assert main(["export", str(out / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "merged")]) == 0
    exported = load(tmp_path / "merged")
    assert exported.extra["classes"] == merged.extra["classes"]
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.allclose(exported.model(pixels), merged.model(pixels), atol=1e-6)  # the head came along


def test_a_task_the_family_cannot_do_is_refused(starts, tmp_path):
    with pytest.raises(ValueError, match="a clip model cannot be fine-tuned for vqa: .* blip"):
        main(["finetune", "--model", starts["clip"], "--task", "vqa", "--out", str(tmp_path / "x")])


def test_grad_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    task = tiny_task("clip")
    pixels, ids = torch.randn(4, 3, 16, 16), torch.randint(1, 20, (4, 8))

    def grads():
        task.model.zero_grad()
        out = task.model(pixels, ids)
        (out.image_embeds @ out.text_embeds.T).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}

    task.model.train()
    plain = grads()
    from vlzoo.finetune import enable_grad_checkpointing

    assert enable_grad_checkpointing(task.model) == 2  # both towers
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_caption_finetune_starts_from_an_export(starts, tmp_path):
    assert main(["export", starts["blip"], "--out", str(tmp_path / "blip-export")]) == 0
    metrics = finetune(str(tmp_path / "blip-export"), "caption", tmp_path / "cap", "--trainer.max_steps", "2",
                       "--trainer.val_check_interval", "2", "--data.shapes.train_size", "64",
                       "--model.init_args.generation.max_length", "4", "--model.init_args.generation.min_length", "1")
    assert {"start/test/bleu4", "test/bleu4", "train/loss"} <= set(metrics)
    config = (tmp_path / "cap" / "config.yaml").read_text()
    assert "losses:\n      - lm" in config  # the captioning recipe trains the LM loss only


def test_momentum_finetune_clears_the_queue_ids_and_refuses_lora(starts):
    from vlzoo.config import FinetuneConfig
    from vlzoo.hub.loaders import load_parts
    from vlzoo.tasks import BLIPTask

    parts = load_parts(starts["blip"])
    parts.model.queue.index.fill_(7)
    task = BLIPTask(tiny_momentum_config(BLIPConfig))
    state, _ = task.initial_state(parts)
    assert (state["queue.index"] == -1).all() and int(state["queue.ptr"]) == 0
    assert torch.equal(state["queue.image"], parts.model.queue.image)  # features stay (as negatives)
    lora = BLIPTask(tiny_momentum_config(BLIPConfig), finetune=FinetuneConfig(lora=LoRAConfig(rank=2)))
    with pytest.raises(ValueError, match="momentum"):
        lora.prepare_finetune()


def test_vqa_command_refuses_a_file_name_as_the_question(starts, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    with pytest.raises(ValueError, match="last argument must be the question"):
        main(["vqa", str(image), str(image), "--model", starts["blip"]])
