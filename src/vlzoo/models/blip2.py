"""BLIP-2 stage 1 (Li et al., 2023): a Q-Former learns to read a frozen image encoder.

The image encoder is frozen (no gradients, eval mode, optionally bf16/fp16); its
tokens pass a trainable LayerNorm (``ln_vision``) and are read by the Q-Former's
learned queries. Three losses share the Q-Former:

- ITC: similarity of an image and a text = max over the queries of
  query . text feature; in-batch negatives gathered (with gradient) from all ranks;
- ITM: queries and text see each other; score = mean over queries of the ITM head;
  hard negatives as in ALBEF;
- ITG: the text, [DEC] first, is generated from the queries alone (text sees the
  queries and earlier text). After stage 1 the Q-Former captions on its own
  (:meth:`BLIP2.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones import VisionEncoder
from vlzoo.backbones.text import pool_tokens
from vlzoo.data.llm_text import left_padded_prompts, seq2seq_batch
from vlzoo.distributed import gather_no_grad, gather_with_grad, token_mean
from vlzoo.layers.micro_batches import in_micro_batches
from vlzoo.layers.transformer import DecodeCache, LMHead
from vlzoo.losses import IGNORE, caption_lm_loss, caption_lm_total, positive_targets
from vlzoo.losses.momentum import soft_cross_entropy, token_cross_entropy
from vlzoo.models.generation import (
    CachedNextLogits,
    GenerationConfig,
    NextTokenLogits,
    generate,
    generation_in_lockstep,
)
from vlzoo.models.itm import itm_with_hard_negatives, micro_batched_itm_logits
from vlzoo.models.qformer import QFormer

FROZEN_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BLIP2Output:
    """losses: name -> scalar (``itc``, ``itm``, ``itg``)."""

    losses: dict[str, Tensor]

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())


def max_query_similarity(query_feats: Tensor, text_feats: Tensor) -> Tensor:
    """(B, Q, E) image query features, (T, E) text features -> (B, T): for each pair
    the largest query . text similarity."""
    return torch.einsum("bqe,te->bqt", query_feats, text_feats).amax(dim=1)


class FrozenImageEncoder(nn.Module):
    """A vision encoder that never trains: no gradients, eval mode, optionally cast to
    bf16/fp16 (``dtype``); outputs (B, N, Dv) tokens in float32."""

    def __init__(self, encoder: VisionEncoder, dtype: str | None = None):
        super().__init__()
        encoder.lock()
        self.encoder = encoder
        self.dtype = None
        if dtype is not None:  # None: as built
            self.set_precision(dtype)

    def set_precision(self, precision: str | None) -> None:
        """Run in ``precision`` (``bf16``, ``fp16``; None or ``fp32``: float32) from now on."""
        if precision not in FROZEN_DTYPES:
            raise ValueError(f"frozen precision must be one of {[k for k in FROZEN_DTYPES if k]}, got {precision!r}")
        self.dtype = FROZEN_DTYPES[precision]
        self.encoder.to(self.dtype or torch.float32)

    @property
    def width(self) -> int:
        return self.encoder.width

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) float32 tokens."""
        x = pixel_values if self.dtype is None else pixel_values.to(self.dtype)
        return self.encoder(x).tokens.float()


class QFormerOverFrozenVision(nn.Module):
    """What both BLIP-2 stages share: the frozen image encoder, the trainable
    ``ln_vision`` on its tokens (its epsilon the tower's ``norm_eps`` when set, else
    1e-5), and the Q-Former that reads them."""

    def __init__(self, vision: VisionEncoder, qformer: QFormer, frozen_precision: str | None = None):
        super().__init__()
        self.vision = FrozenImageEncoder(vision, frozen_precision)
        self.ln_vision = nn.LayerNorm(vision.width, eps=getattr(vision, "norm_eps", None) or 1e-5)
        self.qformer = qformer

    def set_frozen_precision(self, precision: str | None) -> None:
        """Cast the frozen parts to ``precision`` (``bf16``, ``fp16``; None: float32); the
        Q-Former, its queries, ``ln_vision`` and the projections stay float32."""
        self.vision.set_precision(precision)

    def frozen_encoder_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) float32 tokens of the frozen encoder (no gradient),
        in ``micro_batches`` parts where the model has them (stage 1)."""
        return in_micro_batches(self.vision, getattr(self, "micro_batches", 1), pixel_values)

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv): frozen encoder tokens after ``ln_vision``."""
        return self.ln_vision(self.vision(pixel_values))


class BLIP2(QFormerOverFrozenVision):
    """Stage 1: frozen image encoder, ``ln_vision``, Q-Former, ITC/ITM/ITG heads.

    Args:
        vision: the frozen image encoder (typically its penultimate layer).
        qformer: the Q-Former (its cross-attention width = ``vision.width``).
        embed_dim: ITC space (256).
        dec_id, pad_id, eos_id: [DEC] (replaces [CLS] for ITG), padding, end of text.
        temperature: initial ITC temperature, learnable, clamped to
            [min_temperature, max_temperature] after each step.
        text_pooling: ``cls`` (the paper) or ``mean``: the text feature for ITC.
        label_smoothing: of the ITG loss.
        frozen_precision: run the frozen encoder in ``bf16``/``fp16`` (None: fp32).
    """

    fsdp_forward_methods = ("forward_frozen",)  # the training entry besides forward (vlzoo.parallel)
    micro_batches: int = 1  # training passes in that many feature-cached parts (vlzoo.layers.micro_batches)

    def __init__(
        self,
        vision: VisionEncoder,
        qformer: QFormer,
        dec_id: int,
        pad_id: int,
        eos_id: int,
        embed_dim: int = 256,
        temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        text_pooling: str = "cls",
        label_smoothing: float = 0.1,
        frozen_precision: str | None = None,
    ):
        super().__init__(vision, qformer, frozen_precision)
        self.vision_proj = nn.Linear(qformer.width, embed_dim)
        self.text_proj = nn.Linear(qformer.width, embed_dim)
        self.itm_head = nn.Linear(qformer.width, 2)
        self.lm_head = LMHead(qformer.config, qformer.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.temperature_range = (min_temperature, max_temperature)
        self.text_pooling = text_pooling
        self.dec_id, self.pad_id, self.eos_id = dec_id, pad_id, eos_id
        self.label_smoothing = label_smoothing
        for layer in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(layer.weight, std=qformer.config.initializer_range)
            nn.init.zeros_(layer.bias)

    # ---------------------------------------------------------------- features
    def query_features(self, image_tokens: Tensor) -> Tensor:
        """(B, N, Dv) -> (B, Q, E) normalised ITC features of the queries."""
        return F.normalize(self.vision_proj(self.qformer(image_tokens).queries), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) -> (B, E) normalised ITC feature of the text alone."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.qformer(None, input_ids, mask).text
        return F.normalize(self.text_proj(pool_tokens(hidden, mask, self.text_pooling)), dim=-1)

    def image_tokens_and_embeds(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> the frozen tokens ITM reads (B, N, Dv) and the query embeddings (B, Q, E)."""
        tokens = self.image_tokens(pixel_values)
        return tokens, self.query_features(tokens)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, Q, E): one normalised embedding per query."""
        return self.query_features(self.image_tokens(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) -> (B, E) normalised embedding."""
        return self.text_features(input_ids, attention_mask)

    def itm_logits(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
    ) -> Tensor:
        """(P, 2) no-match / match logits: the ITM head averaged over the queries of a
        joint (all-see-all) pass. ``text_hidden`` is unused (the signature of
        :data:`~vlzoo.models.itm.ITMLogits`)."""
        queries = self.qformer(image_tokens, input_ids, attention_mask, "bidirectional").queries
        return self.itm_head(queries).mean(dim=1)

    def itm_score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B,) probability that image i matches text i."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.itm_logits(input_ids, mask, self.image_tokens(pixel_values)).softmax(-1)[:, 1]

    # ---------------------------------------------------------------- training
    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> BLIP2Output:
        """Losses ``itc``, ``itm``, ``itg`` of (B, 3, H, W) images and (B, L) captions
        ([CLS] first); index: (B,) sample ids (equal ids are positives)."""
        return self.forward_frozen(self.frozen_encoder_tokens(pixel_values), input_ids, attention_mask, index)

    def forward_frozen(self, frozen_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor, index: Tensor
                       ) -> BLIP2Output:
        """As :meth:`forward`, from the frozen encoder's tokens (B, N, Dv) (e.g. cached)."""
        k = self.micro_batches
        image_tokens = self.ln_vision(frozen_tokens)  # (B, N, Dv)
        query_feats = in_micro_batches(self.query_features, k, image_tokens)  # (B, Q, E)
        text_feats = in_micro_batches(self.text_features, k, input_ids, attention_mask)  # (B, E)
        loss_itc, sim_t2i, sim_i2t = self.itc(query_feats, text_feats, index)
        itm_logits = micro_batched_itm_logits(self.itm_logits, k, len(input_ids))
        loss_itm = itm_with_hard_negatives(itm_logits, input_ids, attention_mask, index, image_tokens,
                                           sim_t2i, sim_i2t)
        loss_itg = self.itg_loss(image_tokens, input_ids, attention_mask)
        return BLIP2Output({"itc": loss_itc, "itm": loss_itm, "itg": loss_itg})

    def itc(self, query_feats: Tensor, text_feats: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ITC against every rank's batch (gathered with gradient, local-loss form).
        Returns the loss and the (B, W) similarities text->images and image->texts."""
        queries_world, texts_world = gather_with_grad(query_feats), gather_with_grad(text_feats)
        sim_i2t = max_query_similarity(query_feats, texts_world) / self.temp  # (B, W)
        sim_t2i = max_query_similarity(queries_world, text_feats).T / self.temp  # (B, W)
        targets = positive_targets(index, gather_no_grad(index))
        loss = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2
        return loss, sim_t2i, sim_i2t

    def decoder_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Captions ([CLS] first) -> ITG inputs with [DEC] first, and LM labels (pad -> -100)."""
        ids = input_ids.clone()
        ids[:, 0] = self.dec_id
        return ids, ids.masked_fill(attention_mask == 0, IGNORE)

    def decoder_logits(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids ([DEC] first) read from the queries -> (B, L, V) next-token logits."""
        return self.lm_head(self.qformer(image_tokens, input_ids, attention_mask, "causal").text)

    def itg_loss(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Captioning loss of (B, L) captions read from the queries of image tokens (B, N, Dv)."""
        ids, labels = self.decoder_inputs(input_ids, attention_mask)

        def itg_total(tokens: Tensor, ids: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            return caption_lm_total(self.decoder_logits(tokens, ids, mask), labels, self.label_smoothing)

        return token_mean(*in_micro_batches(itg_total, self.micro_batches, image_tokens, ids, attention_mask, labels))

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(*self.temperature_range)

    # --------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_from_tokens(
        self, image_tokens: Tensor, config: GenerationConfig = GenerationConfig()  # noqa: B008
    ) -> Tensor:
        """Q-Former-only captions of image tokens (B, N, Dv) (after ``ln_vision``):
        (B, T) new token ids after [DEC], right-padded."""
        prefix = torch.full((len(image_tokens), 1), self.dec_id, dtype=torch.long, device=image_tokens.device)

        return generate(self._next_logits(image_tokens, config.use_cache), prefix, self.eos_id, self.pad_id, config)

    def _next_logits(self, image_tokens: Tensor, use_cache: bool) -> NextTokenLogits:
        """The Q-Former's ITG next-token logits for captions of image tokens (B, N, Dv)."""
        if not use_cache:
            return lambda ids, rows: self.decoder_logits(image_tokens[rows], ids, torch.ones_like(ids))[:, -1]

        def step(new: Tensor, rows: Tensor, cache: DecodeCache, seen: int) -> Tensor:
            return self.lm_head(self.qformer.decode_step(image_tokens[rows] if seen == 0 else None, new, cache, seen))

        return CachedNextLogits(step, len(self.qformer.encoder.layer))

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, config: GenerationConfig = GenerationConfig()) -> Tensor:  # noqa: B008
        """Q-Former-only captions of (B, 3, H, W) images: (B, T) token ids."""
        return self.generate_from_tokens(self.image_tokens(pixel_values), config)

    def no_weight_decay(self) -> set[str]:
        names = {"temp"} | {f"qformer.{n}" for n in self.qformer.no_weight_decay()}
        return names | {n for n, p in self.named_parameters() if n.startswith("ln_vision")}


LLM_KINDS = ("causal", "seq2seq")


class BLIP2LLM(QFormerOverFrozenVision):
    """Stage 2: the Q-Former's query outputs, projected to the LLM's width
    (``llm_proj``), are a soft visual prompt before the text of a frozen LLM.

    Args:
        vision: the frozen image encoder (as in stage 1).
        qformer: the stage-1 Q-Former (trains on).
        llm: a transformers ``PreTrainedModel`` (``AutoModelForCausalLM`` or
            ``AutoModelForSeq2SeqLM``); frozen here, in ``llm_precision`` when given.
        frozen_precision: of the image encoder.
    Only ``ln_vision``, the Q-Former (with its queries) and ``llm_proj`` train.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        qformer: QFormer,
        llm: nn.Module,
        frozen_precision: str | None = None,
        llm_precision: str | None = None,
    ):
        if llm_precision not in FROZEN_DTYPES:
            raise ValueError(f"llm_precision must be one of {[k for k in FROZEN_DTYPES if k]}, got {llm_precision!r}")
        super().__init__(vision, qformer, frozen_precision)
        self.llm = llm
        self.llm.requires_grad_(False)
        if FROZEN_DTYPES[llm_precision] is not None:
            self.llm.to(FROZEN_DTYPES[llm_precision])
        self.llm_proj = nn.Linear(qformer.width, llm.config.hidden_size)
        self.is_encoder_decoder = bool(getattr(llm.config, "is_encoder_decoder", False))

    def set_frozen_precision(self, precision: str | None) -> None:
        """The image encoder and the LLM in ``precision`` (None: float32)."""
        super().set_frozen_precision(precision)
        dtype = FROZEN_DTYPES[precision] or torch.float32
        for param in self.llm.parameters():  # parameters only: buffers kept float32 (e.g. rotary inv_freq)
            param.data = param.data.to(dtype)

    def train(self, mode: bool = True) -> BLIP2LLM:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout
        return self

    def soft_prompt(self, image_tokens: Tensor, instruction_ids: Tensor | None = None,
                    instruction_mask: Tensor | None = None) -> Tensor:
        """(B, N, Dv) image tokens -> (B, Q, H) LLM input embeddings. With an instruction
        (B, L) (InstructBLIP), queries and instruction share self-attention."""
        if instruction_ids is None:
            queries = self.qformer(image_tokens).queries
        else:
            queries = self.qformer(image_tokens, instruction_ids, instruction_mask, "bidirectional").queries
        embeds = self.llm_proj(queries)
        return embeds.to(self.llm.get_input_embeddings().weight.dtype)

    def _with_soft_prompt(self, soft: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[soft prompt; embedded ids] (B, Q + L, H) and its mask (B, Q + L)."""
        embeds = torch.cat([soft, self.llm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([torch.ones(soft.shape[:2], dtype=attention_mask.dtype, device=soft.device), attention_mask],
                         dim=1)
        return embeds, mask

    def lm_loss(self, soft: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """LM loss of text after the soft prompt (B, Q, H).

        Decoder-only: input_ids/attention_mask/labels (B, L) are prompt + target (labels
        -100 on prompt and padding; the soft prompt is never a label). Encoder-decoder:
        input_ids/attention_mask are the encoder's prompt, labels the decoder's target."""
        embeds, mask = self._with_soft_prompt(soft, input_ids, attention_mask)
        if self.is_encoder_decoder:  # the LLM builds its decoder inputs from the labels
            return token_cross_entropy(self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits,
                                       labels)
        ignore = torch.full(soft.shape[:2], IGNORE, dtype=labels.dtype, device=labels.device)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return caption_lm_loss(logits, torch.cat([ignore, labels], dim=1), label_smoothing=0.0)

    def forward(self, frozen_tokens: Tensor, caption: dict[str, Tensor], vqa: dict[str, Tensor] | None = None,
                instruction: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Training losses from the frozen encoder's tokens (B, N, Dv): ``caption``, and
        ``vqa`` when given. ``caption``/``vqa``: :meth:`lm_loss` keyword batches;
        ``instruction``: the questions (``input_ids``, ``attention_mask``) read by the
        Q-Former with the queries (instruction-aware), else the plain soft prompt serves both."""
        image_tokens = self.ln_vision(frozen_tokens)
        soft = self.soft_prompt(image_tokens)
        losses = {"caption": self.lm_loss(soft, **caption)}
        if vqa is not None:
            if instruction is not None:
                soft = self.soft_prompt(image_tokens, instruction["input_ids"], instruction["attention_mask"])
            losses["vqa"] = self.lm_loss(soft, **vqa)
        return losses

    @torch.no_grad()
    def generate(self, soft: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                 config: GenerationConfig = GenerationConfig(), eos_token_id: int | None = None) -> Tensor:  # noqa: B008
        """Text after the soft prompt (B, Q, H) and a prompt (B, P) (left-padded for a
        decoder-only LLM): (B, T) new token ids, through the LLM's own ``generate``.

        A decoder-only LLM reads ``[left padding; soft prompt; prompt]`` as embeddings, and as
        ``input_ids`` the same positions with ``Q`` placeholder ids for the soft prompt
        (``image_token_id`` when set, as a transformers checkpoint does; else each row's last
        prompt id), so a repetition penalty also counts the prompt (and its padding), as in
        transformers' ``Blip2ForConditionalGeneration``."""
        embeds, mask = self._with_soft_prompt(soft, prompt_ids, prompt_mask)
        ids = {}
        if not self.is_encoder_decoder:
            token = getattr(self, "image_token_id", None)
            fill = prompt_ids[:, -1:] if token is None else torch.full_like(prompt_ids[:, :1], token)
            input_ids = torch.cat([fill.expand(-1, soft.shape[1]), prompt_ids], dim=1)
            # left padding moved in front of the soft prompt: positions count real tokens only
            # for every LLM (OPT counts them from the mask anyway); the penalty sees the same ids
            order = torch.argsort(mask, dim=1, stable=True)
            embeds = torch.gather(embeds, 1, order[..., None].expand_as(embeds))
            mask, ids["input_ids"] = torch.gather(mask, 1, order), torch.gather(input_ids, 1, order)
        kwargs = dict(max_new_tokens=config.max_length, min_new_tokens=config.min_length,
                      repetition_penalty=config.repetition_penalty, length_penalty=config.length_penalty,
                      num_beams=config.num_beams if config.method == "beam" else 1,
                      do_sample=config.method == "nucleus")
        if config.method == "nucleus":
            kwargs.update(top_p=config.top_p, temperature=config.temperature)
        if config.method == "beam":
            kwargs.update(early_stopping=config.early_stopping)
        eos = eos_token_id if eos_token_id is not None else self.llm.config.eos_token_id
        pad = self.llm.config.pad_token_id if self.llm.config.pad_token_id is not None else eos
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                                synced_gpus=generation_in_lockstep(), **ids, **kwargs)
        return out[:, 1:] if self.is_encoder_decoder else out[:, embeds.shape[1]:]  # the decoder start; the prompt


def llm_prompt_batch(model: BLIP2LLM, llm_tokenizer, prompts: list[str], max_length: int) -> dict[str, Tensor]:
    """Text prompts (B,) for generation through ``model``'s LLM: the encoder's input for
    an encoder-decoder LLM, left-padded ids for a decoder-only one; each (B, P)."""
    if model.is_encoder_decoder:
        batch = seq2seq_batch(llm_tokenizer, prompts, [""] * len(prompts), max_length)
        batch.pop("labels")
    else:
        batch = left_padded_prompts(llm_tokenizer, prompts, max_length)
    device = model.llm_proj.weight.device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def llm_answer(model: BLIP2LLM, llm_tokenizer, soft: Tensor, prompts: list[str], config: GenerationConfig,
               max_length: int = 64) -> list[str]:
    """Text generated after a soft prompt (B, Q, H) and each text prompt, decoded."""
    prompt = llm_prompt_batch(model, llm_tokenizer, prompts, max_length)
    ids = model.generate(soft, prompt["input_ids"], prompt["attention_mask"], config,
                         eos_token_id=llm_tokenizer.eos_token_id)
    return [t.strip() for t in llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]
