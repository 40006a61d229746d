"""vlzoo export: safetensors + config, reloaded bit for bit."""

import pytest
import torch
from tiny_configs import save_task_checkpoint, tiny_task

import vlzoo
from vlzoo.cli import main
from vlzoo.hub.export import export_parts
from vlzoo.hub.loaders import load_parts


@pytest.mark.parametrize("family", ["clip", "albef", "blip", "blip2"])
def test_export_then_load_is_bit_identical(tmp_path, family):
    torch.manual_seed(0)
    checkpoint = save_task_checkpoint(tiny_task(family), tmp_path / "task.ckpt")
    parts = load_parts(checkpoint)
    out = export_parts(parts, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "vlzoo_config.yaml"]
    again = vlzoo.load(out)
    assert again.family == family and again.capabilities == parts.capabilities
    original, reloaded = parts.model.state_dict(), again.model.state_dict()
    assert original.keys() == reloaded.keys()
    for key, value in original.items():
        assert torch.equal(value, reloaded[key]), key
    assert again.preprocess_config == parts.preprocess


def test_export_cli_and_truncated_weights_are_an_error(tmp_path):
    checkpoint = save_task_checkpoint(tiny_task("clip"), tmp_path / "task.ckpt")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "clip")]) == 0
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(vlzoo.load(tmp_path / "clip").encode_image(images), vlzoo.load(checkpoint).encode_image(images))
    weights = tmp_path / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors: not a complete safetensors file"):
        vlzoo.load(tmp_path / "clip")


def test_export_to_hf_refuses_families_transformers_lacks(tmp_path):
    checkpoint = save_task_checkpoint(tiny_task("albef"), tmp_path / "task.ckpt")
    with pytest.raises(ValueError, match="no albef class"):
        main(["export", str(checkpoint), "--out", str(tmp_path / "hf"), "--to", "hf"])


def _tiny_hf_blip_vqa(directory):
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=62, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    transformers.BlipForQuestionAnswering(transformers.BlipConfig(text_config=text, vision_config=vision)) \
        .save_pretrained(directory)


def _tiny_hf_blip2_opt(directory):
    import transformers

    torch.manual_seed(0)
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=64, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=4)
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(directory)


@pytest.mark.parametrize("make", [_tiny_hf_blip_vqa, _tiny_hf_blip2_opt], ids=["blip_vqa", "blip2_llm"])
def test_export_of_converted_models_is_bit_identical(tmp_path, make):
    from vlzoo.hub.loaders import load_hf_dir

    make(tmp_path / "hf")
    parts = load_hf_dir(tmp_path / "hf")
    again = load_parts(export_parts(parts, tmp_path / "exported"))
    assert again.family == parts.family
    original, reloaded = parts.model.state_dict(), again.model.state_dict()
    assert original.keys() == reloaded.keys()
    for key, value in original.items():
        assert torch.equal(value, reloaded[key]), key
