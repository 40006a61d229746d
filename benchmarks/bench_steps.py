"""Whole training steps of ALBEF, BLIP and BLIP-2 stage 1, vlzoo against transformers' modules given the same losses and driven by the same step.

One step as training runs it: forward with every loss (ALBEF: ITC with queue and
momentum distillation, ITM on hard negatives, distilled MLM; BLIP: ITC, ITM, LM; BLIP-2
stage 1: ITC, ITM, ITG on a frozen tower), backward, AdamW (the kernel training picks),
and for ALBEF and BLIP the EMA update of the momentum copies and the enqueue
(``bench_length_buckets.training_step``).

The peer is the same step with every network pass run by transformers' modules: the
vlzoo model class is subclassed and its towers replaced by adapters over transformers'
``BlipVisionModel``/``BlipTextModel``/``BlipTextLMHeadModel`` (BLIP), the same text
modules split into a text part and a cross-attending fusion part (ALBEF: transformers has
no ALBEF; BLIP's text model is ALBEF's ``xbert``), and ``Blip2VisionModel`` with
``Blip2QFormerModel`` (BLIP-2; its ITG runs the Q-Former under the causal query/text mask
transformers accepts as a 4-D mask, with BERT's MLM head, which transformers' BLIP-2 lacks).
So losses, hard-negative draws, queue, EMA and optimizer are the same code; only the
networks differ. BLIP and BLIP-2 peers hold vlzoo's weights (``to_hf_blip``,
``to_hf_blip2``), so the first losses agree (printed); ALBEF's peer starts from
transformers' own initialisation, so only its FLOPs are equal.

Both sides read the same token ids, padded to the batch's longest caption (equal tokens:
vlzoo at its defaults, no length buckets). MFU: FLOPs of one step (torch's flop counter)
/ median seconds / this process's measured fp32 matmul peak (``common.matmul_peak``).

    python benchmarks/bench_steps.py --json /tmp/steps.json [--quick] [--threads 2]
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from bench_length_buckets import batch_of, config, training_optimizer, training_step
from common import (
    compare,
    device,
    matmul_peak,
    parameter_mib,
    run_benchmarks,
    train_without_dropout,
)
from torch import Tensor, nn
from transformers.models.blip.modeling_blip_text import BlipTextModel, BlipTextOnlyMLMHead

from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.convert.hf_blip import to_hf_blip
from vlzoo.hub.convert.hf_blip2 import to_hf_blip2
from vlzoo.layers.transformer import qformer_mask
from vlzoo.models.albef import ALBEF
from vlzoo.models.blip import BLIP
from vlzoo.models.blip2 import BLIP2, QFormerOverFrozenVision
from vlzoo.models.builders import build_albef, build_blip, build_blip2
from vlzoo.models.momentum import MomentumModel
from vlzoo.models.qformer import QFormerOutput

# (family, size, batch, timed repeats)
RUNS = [("albef", "tiny", 32, 8), ("blip", "tiny", 32, 8), ("blip2", "tiny", 32, 8),
        ("albef", "base", 4, 2), ("blip", "base", 4, 2), ("blip2", "base", 4, 2)]
QUICK_RUNS = [("albef", "tiny", 8, 2), ("blip", "tiny", 8, 2), ("blip2", "tiny", 8, 2)]
BUILDERS = {"albef": build_albef, "blip": build_blip, "blip2": build_blip2}
CAPABILITIES = frozenset({"encode", "itm", "generate"})


# ----------------------------------------------------------------- adapters
class VisionTower(nn.Module):
    """vlzoo's vision-encoder call on a transformers vision model: pixels (B, 3, H, W) ->
    ``.tokens`` (B, N, D). ``final_norm`` False: the tokens before ``post_layernorm``
    (BLIP-2's frozen tower, whose ``post_layernorm`` is the trainable ``ln_vision``)."""

    def __init__(self, model: nn.Module, final_norm: bool = True):
        super().__init__()
        self.embeddings, self.encoder = model.embeddings, model.encoder
        self.post_layernorm = model.post_layernorm if final_norm else None
        self.width = model.config.hidden_size

    def lock(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        x = self.encoder(inputs_embeds=self.embeddings(pixel_values)).last_hidden_state
        return SimpleNamespace(tokens=x if self.post_layernorm is None else self.post_layernorm(x))


class BlipText(nn.Module):
    """vlzoo's text-encoder call on transformers' ``BlipTextModel``: (B, L) ids and mask ->
    ``.tokens`` (B, L, D) and ``.pooled`` (the [CLS] state); ``context`` (B, N, Dv) image
    tokens for the cross-attention. ``fusion``: a second ``BlipTextModel`` (ALBEF's fusion
    blocks) run on the first one's output by :meth:`fuse_from`."""

    def __init__(self, model: BlipTextModel, fusion: BlipTextModel | None = None):
        super().__init__()
        self.model, self.fusion = model, fusion
        self.config = model.config
        self.width = model.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layers: slice | None = None,
                context: Tensor | None = None) -> SimpleNamespace:
        x = self.model(input_ids, attention_mask, encoder_hidden_states=context).last_hidden_state
        return SimpleNamespace(tokens=x, pooled=x[:, 0])

    def fuse_from(self, text_hidden: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """ALBEF's fusion blocks: (B, L, D) text states and (B, N, Dv) image tokens -> (B, L, D)."""
        return self.fusion(encoder_embeds=text_hidden, attention_mask=attention_mask,
                           encoder_hidden_states=image_tokens).last_hidden_state


class QFormerAdapter(nn.Module):
    """vlzoo's Q-Former call on transformers' ``Blip2QFormerModel``, its text embeddings and
    query tokens (a ``Blip2ForImageTextRetrieval``'s): image tokens (B, N, Dv) -> queries;
    ids/mask (B, L) -> text; both -> one pass under ``mask_kind`` (ITM: bidirectional, as
    transformers' retrieval forward; ITG: the causal mask as a 4-D boolean mask)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.embeddings, self.qformer, self.query_tokens = hf.embeddings, hf.qformer, hf.query_tokens
        self.config = hf.config.qformer_config
        self.width = self.config.hidden_size

    def forward(self, image_tokens: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, mask_kind: str = "unimodal") -> QFormerOutput:
        if image_tokens is None:
            x = self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                             attention_mask=attention_mask).last_hidden_state
            return QFormerOutput(None, x)
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        q = queries.shape[1]
        if input_ids is None:
            return QFormerOutput(self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens)
                                 .last_hidden_state, None)
        if mask_kind == "bidirectional":
            mask = torch.cat([attention_mask.new_ones(len(attention_mask), q), attention_mask], dim=1)
        else:
            mask = qformer_mask(q, attention_mask, mask_kind)
        x = self.qformer(query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries), query_length=q,
                         attention_mask=mask, encoder_hidden_states=image_tokens).last_hidden_state
        return QFormerOutput(x[:, :q], x[:, q:])


# --------------------------------------------------------------- peer models
def momentum_settings(ours: MomentumModel) -> dict[str, Any]:
    low, high = ours.temperature_range
    return dict(embed_dim=ours.embed_dim, queue_size=ours.queue.size, momentum=ours.momentum,
                temperature=ours.temp.item(), min_temperature=low, max_temperature=high)


class PeerBLIP(BLIP):
    """vlzoo's BLIP step over transformers' BLIP modules (``BlipForImageTextRetrieval``'s
    vision model, text encoder, projections and ITM head; ``BlipForConditionalGeneration``'s
    decoder, its cross-attention, feed-forward and embeddings shared with the encoder as in
    BLIP)."""

    def __init__(self, ours: BLIP, retrieval: nn.Module, captioning: nn.Module):
        MomentumModel.__init__(self, VisionTower(retrieval.vision_model), BlipText(retrieval.text_encoder),
                               **momentum_settings(ours))
        self.vision_proj, self.text_proj, self.itm_head = retrieval.vision_proj, retrieval.text_proj, retrieval.itm_head
        self.decoder = captioning.text_decoder
        share_with_encoder(self.decoder, retrieval.text_encoder)
        self.queue.load_state_dict(ours.queue.state_dict())
        self.enc_id, self.dec_id, self.pad_id, self.eos_id = ours.enc_id, ours.dec_id, ours.pad_id, ours.eos_id
        self.prompt_ids, self.label_smoothing = ours.prompt_ids, ours.label_smoothing
        self._make_momentum_copies()

    def decoder_logits(self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                            encoder_hidden_states=image_tokens).logits


def share_with_encoder(decoder: nn.Module, encoder: BlipTextModel) -> None:
    """BLIP's sharing: the decoder (``BlipTextLMHeadModel``) uses the encoder's embeddings,
    cross-attention and feed-forward modules; its LM head stays tied to the embeddings."""
    decoder.bert.embeddings = encoder.embeddings
    for dec, enc in zip(decoder.bert.encoder.layer, encoder.encoder.layer, strict=True):
        dec.crossattention, dec.intermediate, dec.output = enc.crossattention, enc.intermediate, enc.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


class PeerALBEF(ALBEF):
    """vlzoo's ALBEF step over transformers' BLIP modules: ``BlipVisionModel``, a text
    ``BlipTextModel`` of the first N blocks, a fusion ``BlipTextModel`` of M cross-attending
    blocks (no embeddings of its own) and ``BlipTextOnlyMLMHead`` tied to the word
    embeddings; transformers' initialisation."""

    def __init__(self, ours: ALBEF):
        text_cfg, vision_cfg = peer_configs(ours)
        depth = len(ours.text.encoder.layer)
        n_text, n_fusion = ours.fusion_slice.start, depth - ours.fusion_slice.start
        text = BlipTextModel(transformers.BlipTextConfig(**{**text_cfg, "num_hidden_layers": n_text,
                                                            "is_decoder": False}), add_pooling_layer=False)
        fusion = BlipTextModel(transformers.BlipTextConfig(**{**text_cfg, "num_hidden_layers": n_fusion,
                                                              "is_decoder": True}), add_pooling_layer=False)
        fusion.embeddings = None
        vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(**vision_cfg))
        MomentumModel.__init__(self, VisionTower(vision), BlipText(text, fusion), text_layers=ours.text_layers,
                               **momentum_settings(ours))
        self.fusion_slice = ours.fusion_slice
        self.mlm_head = BlipTextOnlyMLMHead(text.config)
        self.mlm_head.predictions.decoder.weight = text.embeddings.word_embeddings.weight
        self.queue.load_state_dict(ours.queue.state_dict())
        self.mask_id, self.special_ids, self.mlm_probability = ours.mask_id, ours.special_ids, ours.mlm_probability
        self._make_momentum_copies()
        self.mlm_head_m.predictions.decoder.weight = self.text_m.model.embeddings.word_embeddings.weight

    def _fuse(self, text, input_ids, attention_mask, image_tokens, text_hidden=None) -> Tensor:
        if text_hidden is None:
            text_hidden = text(input_ids, attention_mask).tokens
        return text.fuse_from(text_hidden, attention_mask, image_tokens)


def peer_configs(ours: ALBEF) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers ``BlipTextConfig`` and ``BlipVisionConfig`` kwargs of ALBEF ``ours``'s sizes."""
    bert = ours.text.config
    text = dict(vocab_size=bert.vocab_size, hidden_size=bert.hidden_size, intermediate_size=bert.intermediate_size,
                num_attention_heads=bert.num_attention_heads, max_position_embeddings=bert.max_position_embeddings,
                encoder_hidden_size=ours.vision.width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vit = ours.vision.model
    vision = dict(hidden_size=ours.vision.width, intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                  num_hidden_layers=len(vit.blocks), num_attention_heads=vit.blocks[0].attn.num_heads,
                  image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0])
    return text, vision


class PeerBLIP2(BLIP2):
    """vlzoo's BLIP-2 stage-1 step over transformers' ``Blip2ForImageTextRetrieval``
    modules (frozen vision model, its ``post_layernorm`` as the trainable ``ln_vision``,
    Q-Former, projections, ITM head) and BERT's MLM head (``BertOnlyMLMHead``) for ITG,
    with vlzoo's ITG head weights."""

    def __init__(self, ours: BLIP2, hf: nn.Module):
        QFormerOverFrozenVision.__init__(self, VisionTower(hf.vision_model, final_norm=False), QFormerAdapter(hf))
        self.ln_vision = hf.vision_model.post_layernorm
        self.vision_proj, self.text_proj, self.itm_head = hf.vision_projection, hf.text_projection, hf.itm_head
        bert = transformers.BertConfig(**{**hf.config.qformer_config.to_dict(), "hidden_act": "gelu"})
        self.lm_head = transformers.models.bert.modeling_bert.BertOnlyMLMHead(bert)
        head = ours.lm_head.state_dict()
        self.lm_head.predictions.load_state_dict({**head, "decoder.bias": head["bias"]}, strict=True)
        self.lm_head.predictions.decoder.weight = hf.embeddings.word_embeddings.weight
        self.temp = nn.Parameter(ours.temp.detach().clone())
        self.temperature_range = ours.temperature_range
        self.text_pooling, self.label_smoothing = ours.text_pooling, ours.label_smoothing
        self.dec_id, self.pad_id, self.eos_id = ours.dec_id, ours.pad_id, ours.eos_id


# ---------------------------------------------------------------------- runs
def build_sides(family: str, size: str) -> tuple[nn.Module, nn.Module, Any, Any]:
    """(vlzoo model, transformers peer, tokenizer, vlzoo config)."""
    cfg, _ = config(family, size)
    if family == "blip2":  # BLIP-2 reads the tower's penultimate block (no final norm): what transformers expresses
        vision = dataclasses.replace(cfg.vision, output_layer=-2, kwargs={**cfg.vision.kwargs, "norm_eps": 1e-6})
        cfg = dataclasses.replace(cfg, vision=vision)  # one LayerNorm epsilon for tower and ln_vision, as transformers
    torch.manual_seed(0)
    ours, tokenizer = BUILDERS[family](cfg)
    parts = LoadedParts(family=family, model=ours, config=cfg, preprocess=cfg.vision, tokenizer=tokenizer,
                        capabilities=CAPABILITIES)
    if family == "blip":
        peer = PeerBLIP(ours, to_hf_blip(parts, "retrieval"), to_hf_blip(parts, "captioning"))
    elif family == "blip2":
        peer = PeerBLIP2(ours, to_hf_blip2(parts))
    else:
        torch.manual_seed(0)
        peer = PeerALBEF(ours)
    return ours, peer, tokenizer, cfg


def run(family: str, size: str, batch: int, repeats: int) -> dict[str, Any]:
    dev = device()
    ours, peer, tokenizer, cfg = build_sides(family, size)
    ours, peer = ours.to(dev), peer.to(dev)
    train_without_dropout(ours, peer)
    optimizers = {"vlzoo": training_optimizer(ours), "transformers": training_optimizer(peer)}
    x = batch_of(batch, cfg.vision.image_size, tokenizer, dev)

    def side(name: str, model: nn.Module):
        def step() -> Tensor:
            torch.manual_seed(0)  # the same MLM masks and hard negatives on both sides, every call
            return training_step(family, model, optimizers[name], x)
        return step

    result = compare({"vlzoo": side("vlzoo", ours), "transformers": side("transformers", peer)}, batch, repeats, dev,
                     memory=True)
    peak = matmul_peak(torch.float32, dev)["flop_s"]
    for name in ("vlzoo", "transformers"):
        result[name]["mfu"] = result[name]["achieved_gflop_s"] * 1e9 / peak
    result.update(family=family, size=size, batch=batch, dtype="fp32", text_tokens=x["input_ids"].shape[1],
                  matmul_peak_gflop_s=peak / 1e9, same_weights=family != "albef",
                  parameter_mib={"vlzoo": parameter_mib(ours), "transformers": parameter_mib(peer)},
                  trainable={name: sum(p.numel() for p in model.parameters() if p.requires_grad)
                             for name, model in (("vlzoo", ours), ("transformers", peer))},
                  first_loss_abs_diff=None if family == "albef" else  # different initial weights
                  abs(result["vlzoo"]["output"] - result["transformers"]["output"]))
    print(f"  {family} {size}: GFLOP/step vlzoo {result['vlzoo']['flops'] / 1e9:.1f}, transformers "
          f"{result['transformers']['flops'] / 1e9:.1f}; MFU {result['vlzoo']['mfu']:.2f} / "
          f"{result['transformers']['mfu']:.2f} (peak {peak / 1e9:.0f} GFLOP/s); first loss "
          f"{result['vlzoo']['output']:.5f} / {result['transformers']['output']:.5f}"
          f"{'' if family != 'albef' else ' (different initial weights)'}", flush=True)
    return result


def main() -> None:
    run_benchmarks(__doc__.split("\n\n")[0], "train_steps", "transformers", RUNS, QUICK_RUNS, run)


if __name__ == "__main__":
    main()
