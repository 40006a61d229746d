"""``vlzoo.load(..., dtype=...)``: BLIP-2's frozen parts (vision tower, LLM) in half
precision with the Q-Former in float32, the LLM read straight into its dtype on top of a
meta-device build (never as a float32 copy: peak memory measured), CLIP cast whole, and
the errors of an unsupported dtype or a checkpoint that does not match."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_hf_blip2 import (
    IMAGE_TOKEN,
    OPT,
    QUERIES,
    T5,
    VISION,
    _perturbed,
    _small_llm_tokenizer,
)
from transformers import AutoModelForCausalLM, Blip2Config, Blip2ForConditionalGeneration

import vlzoo
from vlzoo import weights
from vlzoo.weights import CheckpointKeyError, LazyWeights

QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=64,
               max_position_embeddings=24, cross_attention_frequency=1, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2,
             eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
LLMS = {"opt": OPT, "t5": T5, "llama": LLAMA}  # llama: a rotary inv_freq buffer that is not in the checkpoint
HALF = ("vision.", "llm.")  # BLIP-2's frozen parts; everything else stays float32


def _blip2_dir(directory: Path, text_config: dict, qformer: dict = QFORMER, perturb: float | None = 0.5) -> Path:
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=VISION, qformer_config=qformer, text_config=text_config,
                      num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    ref = Blip2ForConditionalGeneration(cfg)
    ref = _perturbed(ref, perturb) if perturb else ref.eval()
    ref.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(LLMS))
def stage2(request, tmp_path_factory) -> Path:
    """A tiny random BLIP-2 stage-2 directory with a word-level LLM tokenizer."""
    directory = _blip2_dir(tmp_path_factory.mktemp(f"blip2_{request.param}"), LLMS[request.param], perturb=0.1)
    _small_llm_tokenizer().save_pretrained(directory)
    return directory


def _seeded_load(directory: Path, **kwargs) -> vlzoo.ZooModel:
    """vlzoo.load with the random init of what the checkpoint lacks (stage 2's Q-Former text path) fixed."""
    torch.manual_seed(0)
    return vlzoo.load(directory, **kwargs)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ------------------------------------------------------------------------ placement
def test_bf16_blip2_keeps_the_qformer_in_float32_and_runs(stage2):
    full, half = vlzoo.load(stage2), vlzoo.load(stage2, dtype=torch.bfloat16)
    for name, param in half.model.named_parameters():
        assert param.dtype == (torch.bfloat16 if name.startswith(HALF) else torch.float32), name
    assert not any(t.is_meta for t in [*half.model.parameters(), *half.model.buffers()])
    assert (half.config.frozen_precision, half.config.llm_precision) == ("bf16", "bf16")
    assert (full.config.frozen_precision, full.config.llm_precision) == (None, None)

    # the LLM read straight into bf16 is the float32 LLM rounded, ties and buffers included
    ours, reference = half.model.llm, full.model.llm
    assert torch.equal(ours.get_input_embeddings().weight, reference.get_input_embeddings().weight.bfloat16())
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value.to(ours.state_dict()[name].dtype)), name
    for name, buffer in reference.named_buffers():  # non-persistent ones (llama's inv_freq) made, not loaded
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, rtol=0, atol=0)
    if ours.get_output_embeddings() is not None and reference.config.tie_word_embeddings:
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight

    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    prompt, mask = torch.randint(3, 17, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    decoder = {"decoder_input_ids": torch.randint(3, 17, (2, 3))} if ours.config.is_encoder_decoder else {}
    logits = {}
    with torch.no_grad():
        for key, zoo in (("fp32", full), ("bf16", half)):
            tokens = zoo.model.image_tokens(pixels)
            soft = zoo.model.soft_prompt(tokens)
            assert tokens.dtype == torch.float32 and soft.dtype == zoo.model.llm.dtype
            embeds, full_mask = zoo.model._with_soft_prompt(soft, prompt, mask)
            logits[key] = zoo.model.llm(inputs_embeds=embeds, attention_mask=full_mask, **decoder).logits
    similarity = _cosine(logits["bf16"], logits["fp32"])
    print(f"{ours.config.model_type}: bf16 vs fp32 LLM logits cosine {similarity:.5f}")
    assert logits["bf16"].dtype == torch.bfloat16 and similarity > 0.99

    captions = half.generate(pixels, max_length=4, min_length=1, method="greedy")
    answers = half.vqa(pixels, ["what colour?", "how many?"], num_beams=2, method="beam")
    assert len(captions) == len(answers) == 2 and all(isinstance(t, str) for t in captions + answers)


def test_fp16_stage1_and_float32_upcast(tmp_path):
    """Stage 1 (retrieval): the tower in fp16, the Q-Former and projections float32; an
    fp16 model cast back with dtype=float32 is all float32 again."""
    from test_convert_hf_blip2 import QFORMER as BERT_QFORMER
    from transformers import Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=VISION, qformer_config=dict(BERT_QFORMER, use_qformer_text_input=True),
                      text_config=OPT, num_query_tokens=QUERIES, image_text_hidden_size=16)
    _perturbed(Blip2ForImageTextRetrieval(cfg)).save_pretrained(tmp_path)
    full, half = vlzoo.load(tmp_path), vlzoo.load(tmp_path, dtype=torch.float16)
    for name, param in half.model.named_parameters():
        assert param.dtype == (torch.float16 if name.startswith("vision.") else torch.float32), name
    pixels = torch.randn(2, 3, 32, 32)
    assert _cosine(half.encode_image(pixels), full.encode_image(pixels)) > 0.999
    assert half.config.frozen_precision == "fp16"

    from vlzoo.hub.convert.precision import cast_parts
    from vlzoo.hub.loaders import load_parts

    parts = cast_parts(load_parts(tmp_path, torch.float16), torch.float32)
    assert {p.dtype for p in parts.model.parameters()} == {torch.float32} and parts.config.frozen_precision is None


def test_clip_is_cast_whole_and_takes_float32_images(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)).save_pretrained(tmp_path)
    full, half = vlzoo.load(tmp_path), vlzoo.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 16))
    image = half.encode_image(pixels)  # float32 pixels: the tower casts them
    assert image.dtype == torch.bfloat16 and _cosine(image, full.encode_image(pixels)) > 0.99
    assert _cosine(half.encode_text(ids), full.encode_text(ids)) > 0.99


@pytest.mark.parametrize("architecture", ["BlipForImageTextRetrieval", "BlipForConditionalGeneration"])
def test_blip_is_cast_whole_and_runs(architecture, tmp_path):
    from test_convert_hf_blip import hf_model, images, write_tokenizer

    hf_model(architecture).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    model, pixels = vlzoo.load(tmp_path, dtype=torch.float16), images()
    assert {p.dtype for p in model.model.parameters()} == {torch.float16}
    if "generate" in model.capabilities:
        assert len(model.generate(pixels, method="beam", num_beams=2, max_length=4)) == 2
    else:
        full = vlzoo.load(tmp_path).itm_score(pixels, ["w5 w6 w7", "w8"])
        torch.testing.assert_close(model.itm_score(pixels, ["w5 w6 w7", "w8"]).float(), full, atol=5e-3, rtol=0)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "bf16"])
def test_an_unsupported_dtype_is_a_value_error_naming_the_choices(dtype, tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of torch\.float32, torch\.bfloat16, torch\.float16 "
                                         r"or None.*got"):
        vlzoo.load(tmp_path, dtype=dtype)  # refused before anything is read


def test_lazy_llm_loading_is_strict(tmp_path):
    """Missing, unexpected and misshapen LLM tensors are named; a NaN is refused."""
    source = _blip2_dir(tmp_path / "src", OPT, perturb=None)
    state = load_file(source / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    fc1 = "language_model.model.decoder.layers.0.fc1.weight"

    cases = {
        "missing": ({k: v for k, v in state.items() if k != fc1}, CheckpointKeyError, rf"missing keys \['{fc1}'\]"),
        "unexpected": ({**state, "language_model.adapter.weight": torch.zeros(2)}, CheckpointKeyError,
                       r"unexpected keys \['language_model.adapter.weight'\]"),
        "shape": ({**state, fc1: torch.zeros(3, 32)}, ValueError, rf"{fc1}: \(3, 32\) vs \(64, 32\)"),
        "nan": ({**state, fc1: torch.full((64, 32), float("nan"))}, ValueError, rf"NaN.*{fc1}"),
    }
    for name, (tensors, error, message) in cases.items():
        save_file(tensors, tmp_path / "model.safetensors")
        with pytest.raises(error, match=message):
            vlzoo.load(tmp_path, dtype=torch.bfloat16)
        print(name, "refused")


def test_pytorch_bin_weights_and_chunked_conversion(tmp_path, monkeypatch):
    """pytorch_model.bin read memory-mapped gives the same model as safetensors; a tensor
    converted in row blocks equals one converted whole."""
    source = _blip2_dir(tmp_path / "src", OPT)
    (tmp_path / "bin").mkdir()
    shutil.copy(source / "config.json", tmp_path / "bin" / "config.json")
    torch.save(load_file(source / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    monkeypatch.setattr(weights, "CHUNK_BYTES", 256)  # a few rows at a time
    for directory in (source, tmp_path / "bin"):
        lazy = LazyWeights(directory)
        name = "language_model.model.decoder.embed_tokens.weight"
        assert torch.equal(lazy.read(name, torch.bfloat16), lazy[name].bfloat16())
    a, b = (_seeded_load(d, dtype=torch.float16) for d in (source, tmp_path / "bin"))  # same random parts
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------------ peak memory
MID_OPT = dict(model_type="opt", vocab_size=16384, hidden_size=512, word_embed_proj_dim=512, num_hidden_layers=12,
               ffn_dim=2048, num_attention_heads=8, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
               bos_token_id=2, eos_token_id=2, pad_token_id=1)

PROBE = r'''
import gc, json, sys, threading, time
import torch
import vlzoo
import vlzoo.hub.convert.hf_blip2
import timm  # imported by the load, not counted
import transformers.models.opt.modeling_opt
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Blip2Config

mode, directory = sys.argv[1], sys.argv[2]


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def load():
    if mode == "vlzoo":
        return vlzoo.load(directory, dtype=torch.bfloat16)
    # the control: the LLM built in float32, the checkpoint loaded into it, then cast
    llm = AutoModelForCausalLM.from_config(Blip2Config.from_pretrained(directory).text_config, dtype=torch.float32)
    with safe_open(directory + "/model.safetensors", "pt") as f:
        state = {k[len("language_model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("language_model.")}
    llm.load_state_dict(state, strict=False)
    del state
    return llm.to(torch.bfloat16)


torch.zeros(64).to(torch.bfloat16)  # first-use allocations before the baseline
gc.collect()
baseline = peak = status("RssAnon")
done = threading.Event()


def sample():
    global peak
    while not done.is_set():
        peak = max(peak, status("RssAnon"))
        time.sleep(0.001)


thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
peak = max(peak, status("RssAnon"))
done.set()
thread.join()
print(json.dumps({"baseline": baseline, "peak": peak, "after": status("RssAnon"), "hwm": status("VmHWM"),
                  "seconds": seconds}))
'''


def _has_rss_anon() -> bool:
    try:
        return "RssAnon:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def _probes(directory: Path, *modes: str) -> list[dict]:
    """Run the probe for each mode, each in a fresh process, all at once."""
    runs = [subprocess.Popen([sys.executable, "-c", PROBE, mode, str(directory)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for mode in modes]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not _has_rss_anon(), reason="/proc/self/status has no RssAnon (not Linux)")
def test_bf16_load_never_holds_a_float32_copy_of_the_llm(tmp_path):
    qformer = dict(QFORMER, num_hidden_layers=1)
    with torch.device("meta"):  # the LLM's size, without building it
        llm = AutoModelForCausalLM.from_config(Blip2Config(text_config=MID_OPT).text_config)
    fp32_bytes = sum(p.numel() for p in llm.parameters()) * 4
    _blip2_dir(tmp_path, MID_OPT, qformer, perturb=None)

    new, control = _probes(tmp_path, "vlzoo", "control")
    rise = {k: (r["peak"] - r["baseline"]) / fp32_bytes for k, r in (("vlzoo", new), ("control", control))}
    mib = 1 << 20
    print(f"LLM float32 {fp32_bytes / mib:.0f} MiB; peak RssAnon rise: vlzoo.load(bf16) "
          f"{(new['peak'] - new['baseline']) / mib:.0f} MiB ({rise['vlzoo']:.2f}x) in {new['seconds']:.1f} s, "
          f"VmHWM {new['hwm'] / mib:.0f} MiB; control (fp32 build, load, cast) "
          f"{(control['peak'] - control['baseline']) / mib:.0f} MiB ({rise['control']:.2f}x), "
          f"VmHWM {control['hwm'] / mib:.0f} MiB")
    assert rise["vlzoo"] < 0.75, rise  # the bf16 LLM alone is 0.5x
    assert rise["control"] >= 0.9, rise  # the measurement sees a float32 copy when there is one
