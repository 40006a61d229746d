"""BLIP, vlzoo vs transformers, at identical configurations and weights.

transformers' ``BlipForImageTextRetrieval`` / ``BlipForConditionalGeneration`` are built
at a size and converted to vlzoo with ``hf_blip_parts``, so both sides hold the same
weights and read the same token ids.

- ``itm``: ITC + ITM forward (inference, no gradient): image tower once, unimodal text
  pass, both projections, the (B, B) similarity, then the image-grounded text pass
  ([ENC] first) and the ITM head on the B pairs. The transformers side composes its
  model's own sub-modules the way its ``forward`` does (``vision_model``,
  ``text_encoder``, ``vision_proj``/``text_proj``, ``itm_head``), with the tower run
  once, not once per head as two ``forward`` calls would.
- ``lm``: captioning loss forward + backward (image tower, causal decoder with
  cross-attention, LM head, label-smoothed cross-entropy 0.1); gradients cleared after.
- ``caption``: captioning inference, beam search (3 beams, 20 new tokens, at least 5):
  image tower, then the decoder with its key/value cache on both sides (vlzoo's
  ``generate``, transformers' ``generate``); ``tokens_equal`` says whether both produced
  the same captions. A third side, vlzoo re-running the whole sequence each step
  (``use_cache=False``), gives ``cache_speedup`` (same tokens, ``cache_tokens_equal``).

    python benchmarks/bench_blip.py --json /tmp/blip.json [--quick]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from common import (
    captions,
    compare,
    device,
    parameter_mib,
    run_benchmarks,
    train_without_dropout,
)

from vlzoo.data.tokenizers import ShapesTokenizer
from vlzoo.hub.convert.hf_blip import CAPTIONING, RETRIEVAL, hf_blip_parts
from vlzoo.models.generation import GenerationConfig

SIZES = {  # text, vision, embed dim
    "tiny": (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64),
             dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3, image_size=64,
                  patch_size=8), 128),
    "base-224": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=512),
                 dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16), 256),
}
# (task, size, batch, timed repeats)
RUNS = [("itm", "tiny", 32, 25), ("itm", "base-224", 4, 4), ("lm", "tiny", 32, 25), ("lm", "base-224", 2, 4),
        ("caption", "tiny", 16, 10), ("caption", "base-224", 2, 3)]
QUICK_RUNS = [("itm", "tiny", 16, 5), ("lm", "tiny", 16, 5), ("caption", "tiny", 8, 3)]
BEAM = GenerationConfig(method="beam", num_beams=3, max_length=20, min_length=5)
BASE_VOCAB = 30524  # BLIP's: bert-base-uncased + [DEC] + [ENC]


def hf_config(size: str, tokenizer: ShapesTokenizer) -> transformers.BlipConfig:
    """A transformers BLIP config of ``size``; special ids are the shapes tokenizer's
    (tiny) or BLIP's [DEC]/[ENC] at the end of a BERT-sized vocabulary (base)."""
    text, vision, embed = SIZES[size]
    info = tokenizer.info
    vocab, dec = (info.vocab_size, info.dec_id) if size == "tiny" else (BASE_VOCAB, BASE_VOCAB - 2)
    text = {**text, "vocab_size": vocab, "bos_token_id": dec, "sep_token_id": info.eos_id,
            "eos_token_id": info.eos_id, "pad_token_id": info.pad_id, "label_smoothing": 0.1,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed)


def build_pair(architecture: str, size: str, tokenizer: ShapesTokenizer):
    """(transformers model, vlzoo BLIP with its weights)."""
    torch.manual_seed(0)
    hf = getattr(transformers, architecture)(hf_config(size, tokenizer))
    config = {**hf.config.to_dict(), "architectures": [architecture]}
    ours = hf_blip_parts(hf.state_dict(), config, source=f"transformers {architecture}").model
    return hf, ours


def inputs(size: str, batch: int, tokenizer: ShapesTokenizer, dev: torch.device) -> dict[str, torch.Tensor]:
    image = SIZES[size][1]["image_size"]
    tokens = tokenizer(captions(batch))
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))
    return {"pixels": pixels.to(dev), **{k: v.to(dev) for k, v in tokens.items()}}


def itm_sides(hf, ours, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ITC similarity (B, B) and ITM logits (B, 2), concatenated, of each side."""
    ids, mask, pixels = x["input_ids"], x["attention_mask"], x["pixels"]
    enc_ids = ids.clone()
    enc_ids[:, 0] = ours.enc_id

    @torch.no_grad()
    def vlzoo() -> torch.Tensor:
        image_tokens, image_feat = ours.image_tokens_and_feat(pixels)
        _, text_feat = ours.text_hidden_and_feat(ids, mask)
        return torch.cat([image_feat @ text_feat.T, ours.itm_logits(ids, mask, image_tokens)], dim=1)

    @torch.no_grad()
    def peer() -> torch.Tensor:
        image_embeds = hf.vision_model(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        image_feat = F.normalize(hf.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(hf.text_proj(text[:, 0]), dim=-1)
        fused = hf.text_encoder(input_ids=enc_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts).last_hidden_state
        return torch.cat([image_feat @ text_feat.T, hf.itm_head(fused[:, 0])], dim=1)

    return {"vlzoo": vlzoo, "transformers": peer}


def lm_sides(hf, ours, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Captioning loss, forward + backward, of each side ([DEC] replaces [CLS])."""
    ids, mask, pixels = x["input_ids"], x["attention_mask"], x["pixels"]
    dec_ids, dec_mask, labels = ours.caption_labels(ids, mask)

    def vlzoo() -> torch.Tensor:
        loss = ours.lm_loss(ours.vision(pixels).tokens, ids, mask)
        loss.backward()
        ours.zero_grad(set_to_none=True)
        return loss.detach()

    def peer() -> torch.Tensor:
        loss = hf(pixel_values=pixels, input_ids=dec_ids, attention_mask=dec_mask, labels=labels).loss
        loss.backward()
        hf.zero_grad(set_to_none=True)
        return loss.detach()

    return {"vlzoo": vlzoo, "transformers": peer}


def caption_sides(hf, ours, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Beam-search captions (B, 20) of each side, after [DEC]."""
    pixels = x["pixels"]
    prefix = torch.full((len(pixels), 1), ours.dec_id, dtype=torch.long, device=pixels.device)

    @torch.no_grad()
    def vlzoo() -> torch.Tensor:
        return ours.generate(pixels, prefix, BEAM)

    @torch.no_grad()
    def peer() -> torch.Tensor:
        return hf.generate(pixel_values=pixels, max_new_tokens=BEAM.max_length, min_new_tokens=BEAM.min_length,
                           num_beams=BEAM.num_beams, do_sample=False, early_stopping=BEAM.early_stopping)[:, 1:]

    @torch.no_grad()
    def vlzoo_no_cache() -> torch.Tensor:
        return ours.generate(pixels, prefix, dataclasses.replace(BEAM, use_cache=False))

    return {"vlzoo": vlzoo, "transformers": peer, "vlzoo_no_cache": vlzoo_no_cache}


SIDES = {"itm": itm_sides, "lm": lm_sides, "caption": caption_sides}


def run(task: str, size: str, batch: int, repeats: int) -> dict[str, Any]:
    dev = device()
    tokenizer = ShapesTokenizer()
    hf, ours = build_pair(RETRIEVAL if task == "itm" else CAPTIONING, size, tokenizer)
    hf, ours = hf.to(dev), ours.to(dev)
    train_without_dropout(hf, ours)
    if task != "lm":  # inference
        hf.eval()
        ours.eval()
    x = inputs(size, batch, tokenizer, dev)
    sides = SIDES[task](hf, ours, x)
    result = compare(sides, batch, repeats, dev)
    a, b = (torch.tensor(result[s]["output"]) for s in ("vlzoo", "transformers"))
    result.update(task=task, size=size, batch=batch, text_tokens=x["input_ids"].shape[1],
                  parameter_mib=parameter_mib(hf), output_max_abs_diff=(a - b).abs().max().item())
    if task == "caption":
        ours_tokens, peer_tokens, rerun_tokens = (sides[s]() for s in ("vlzoo", "transformers", "vlzoo_no_cache"))
        result["tokens_equal"] = ours_tokens.shape == peer_tokens.shape and bool((ours_tokens == peer_tokens).all())
        result["cache_tokens_equal"] = torch.equal(ours_tokens, rerun_tokens)
        result["cache_speedup"] = result["vlzoo_no_cache"]["median_s"] / result["vlzoo"]["median_s"]
    return result


def main() -> None:
    run_benchmarks(__doc__.split("\n\n")[0], "blip", "transformers", RUNS, QUICK_RUNS, run)


if __name__ == "__main__":
    main()
