"""What ALBEF and BLIP share: momentum encoders, feature queues, ITC and ITM.

:class:`MomentumModel` holds an image encoder, a BERT-style text encoder on the shared
block, projections to a joint space, their momentum (EMA) copies, the feature queue,
the learnable temperature and the ITM head. Subclasses say how text and image are
fused (:meth:`MomentumModel.fuse`) and add their own generative loss (ALBEF: MLM,
BLIP: LM). The EMA update and the enqueue are separate methods that the training
task calls once per optimizer step — never ``forward``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones import BertTextEncoder, VisionEncoder
from vlzoo.distributed import gather_no_grad, local_tensor
from vlzoo.layers.micro_batches import in_micro_batches
from vlzoo.losses import distilled_itc_loss, positive_targets
from vlzoo.models.itm import itm_with_hard_negatives, micro_batched_itm_logits


@dataclass
class MomentumOutput:
    """losses: name -> scalar; image_feat_m, text_feat_m: (B, D) momentum features of
    this rank's batch and index (B,) its sample ids, to enqueue after the step."""

    losses: dict[str, Tensor]
    image_feat_m: Tensor
    text_feat_m: Tensor
    index: Tensor

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())


class FeatureQueue(nn.Module):
    """Ring buffers of momentum features: ``image``/``text`` (Q, D), ``index`` (Q,) sample
    ids (-1 for the random initial entries), ``ptr`` the next write position.
    Registered buffers, so they travel in checkpoints."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue_size must be positive, got {size}")
        self.size = size
        self.register_buffer("image", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("text", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_global_batch(self, global_batch: int) -> None:
        """A clear error unless ``global_batch`` (batch x processes) divides the queue size."""
        if self.size % global_batch:
            raise ValueError(
                f"queue_size {self.size} is not divisible by the global batch {global_batch} "
                "(data.batch_size x devices x nodes); change model.queue_size or data.batch_size"
            )

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, index: Tensor, applied: Tensor | None = None) -> None:
        """Write (G, D), (G, D), (G,) — the features of the whole global batch. ``applied``
        (0-d bool, from a step skipped on the device): where False nothing changes."""
        n = image_feat.shape[0]
        self.check_global_batch(n)  # so a write never wraps: rows ptr .. ptr + n - 1
        rows = self.ptr + torch.arange(n, device=self.ptr.device)  # on the device: no host synchronisation
        for buffer, new in ((self.image, image_feat), (self.text, text_feat), (self.index, index)):
            new = new.to(buffer.dtype)
            if applied is not None:
                new = torch.where(applied, new, buffer[rows].reshape(new.shape))
            buffer.index_copy_(0, rows, new)
        advance = n if applied is None else n * applied.long()
        self.ptr.copy_((self.ptr + advance) % self.size)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy whose parameters will follow ``module`` by EMA."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class MomentumModel(nn.Module):
    """Base of ALBEF and BLIP.

    Args:
        vision: image encoder; its tokens (B, N, Dv) feed the text side's cross-attention.
        text: BERT-style encoder whose cross-attention layers attend to image tokens.
        embed_dim: joint ITC space (256 in the papers).
        queue_size: momentum features kept as extra ITC negatives.
        momentum: EMA coefficient m.
        temperature: initial ITC temperature, clamped to [min_temperature, max_temperature].
        text_layers: the blocks of the unimodal text pass (ALBEF: the first N; BLIP: all).

    ``micro_batches``: :meth:`forward` runs each per-sample pass (the encoders, their
    momentum copies, ITM's fusion, the generative loss) in that many feature-cached
    micro-batches (:mod:`vlzoo.layers.micro_batches`); ITC, the queue and the hard
    negatives still see the whole batch.
    """

    micro_batches: int = 1
    reuses_text_pass: bool = True  # fuse() reads the unimodal text pass (ALBEF); BLIP re-embeds the ids

    momentum_pairs: tuple[tuple[str, str], ...] = (
        ("vision", "vision_m"), ("vision_proj", "vision_proj_m"), ("text", "text_m"), ("text_proj", "text_proj_m"),
    )

    def __init__(
        self,
        vision: VisionEncoder,
        text: BertTextEncoder,
        *,
        embed_dim: int,
        queue_size: int,
        momentum: float,
        temperature: float,
        min_temperature: float,
        max_temperature: float,
        text_layers: slice = slice(None),
    ):
        super().__init__()
        self.vision, self.text = vision, text
        self.vision_proj = nn.Linear(vision.width, embed_dim)
        self.text_proj = nn.Linear(text.width, embed_dim)
        self.itm_head = nn.Linear(text.width, 2)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.temperature_range = (min_temperature, max_temperature)
        self.momentum = momentum
        self.text_layers = text_layers
        self.embed_dim = embed_dim
        self.queue = FeatureQueue(queue_size, embed_dim)

    def _make_momentum_copies(self) -> None:
        """Call at the end of a subclass ``__init__``, after every paired module exists."""
        for online, twin in self.momentum_pairs:
            setattr(self, twin, momentum_copy(getattr(self, online)))

    # ----------------------------------------------------------------- unimodal
    def image_tokens_and_feat(self, pixel_values: Tensor, momentum: bool = False) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> image tokens (B, N, Dv) and normalised feature (B, D)."""
        vision, proj = (self.vision_m, self.vision_proj_m) if momentum else (self.vision, self.vision_proj)
        tokens = vision(pixel_values).tokens
        return tokens, F.normalize(proj(tokens[:, 0]), dim=-1)

    def text_hidden_and_feat(
        self, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Unimodal text pass: hidden (B, L, Dt) and normalised feature (B, D) of the
        pooled text (the [CLS] token, or the token mean; see ``text.pooling``)."""
        text, proj = (self.text_m, self.text_proj_m) if momentum else (self.text, self.text_proj)
        out = text(input_ids, attention_mask, layers=self.text_layers)
        return out.tokens, F.normalize(proj(out.pooled), dim=-1)

    def image_tokens_and_embeds(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> the tokens ITM reads (B, N, Dv) and the ITC embeddings (B, D)."""
        return self.image_tokens_and_feat(pixel_values)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) normalised ITC embedding."""
        return self.image_tokens_and_feat(pixel_values)[1]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) -> (B, D) normalised ITC embedding."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.text_hidden_and_feat(input_ids, mask)[1]

    # ------------------------------------------------------------------ fusion
    def fuse(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
    ) -> Tensor:
        """Image-grounded text: (B, L) ids, (B, N, Dv) image tokens -> (B, L, Dt).
        ``text_hidden`` may carry the unimodal pass already computed for these ids."""
        raise NotImplementedError

    def itm_logits(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
    ) -> Tensor:
        """(B, 2) match / no-match logits of each (text, image) pair."""
        return self.itm_head(self.fuse(input_ids, attention_mask, image_tokens, text_hidden)[:, 0])

    def itm_score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B,) probability that image i matches text i."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        tokens, _ = self.image_tokens_and_feat(pixel_values)
        return self.itm_logits(input_ids, mask, tokens).softmax(-1)[:, 1]

    # ----------------------------------------------------------------- training
    def itc_itm(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, index: Tensor, alpha: float
    ) -> tuple[MomentumOutput, Tensor, Tensor]:
        """ITC (queue + momentum distillation) and ITM (hard negatives from all ranks).

        ITC scores this rank's online features against the momentum features of every
        rank's batch (all-gathered, no gradient needed) and of the queue, so a batch
        split over ranks gives the loss of the union batch.

        Returns the output so far, the image tokens (B, N, Dv) and the momentum image
        tokens (B, N, Dv), which the subclass's own loss reuses.
        """
        k = self.micro_batches
        image_tokens, image_feat = in_micro_batches(self.image_tokens_and_feat, k, pixel_values)
        text_hidden, text_feat = in_micro_batches(self.text_hidden_and_feat, k, input_ids, attention_mask)
        temp = self.temp
        with torch.no_grad():
            image_tokens_m, image_feat_m = in_micro_batches(
                partial(self.image_tokens_and_feat, momentum=True), k, pixel_values)
            _, text_feat_m = in_micro_batches(
                partial(self.text_hidden_and_feat, momentum=True), k, input_ids, attention_mask)
            # every rank's momentum features of this step, then the queue: (W + Q, D)
            image_all = torch.cat([gather_no_grad(image_feat_m), self.queue.image])
            text_all = torch.cat([gather_no_grad(text_feat_m), self.queue.text])
            targets = positive_targets(index, torch.cat([gather_no_grad(index), self.queue.index]))
            sim_i2t_m, sim_t2i_m = image_feat_m @ text_all.T / temp, text_feat_m @ image_all.T / temp
        loss_itc = distilled_itc_loss(
            image_feat @ text_all.T / temp, text_feat @ image_all.T / temp, sim_i2t_m, sim_t2i_m, targets, alpha
        )
        loss_itm = self._itm_with_hard_negatives(
            input_ids, attention_mask, index, image_tokens, image_feat, text_hidden, text_feat
        )
        out = MomentumOutput({"itc": loss_itc, "itm": loss_itm}, image_feat_m, text_feat_m, index)
        return out, image_tokens, image_tokens_m

    def _itm_with_hard_negatives(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        index: Tensor,
        image_tokens: Tensor,
        image_feat: Tensor,
        text_hidden: Tensor,
        text_feat: Tensor,
    ) -> Tensor:
        """ITM over positives and hard negatives drawn from the batch of every rank."""
        with torch.no_grad():
            temp = self.temp.detach()
            sim_t2i = text_feat @ gather_no_grad(image_feat).T / temp  # (B, world B)
            sim_i2t = image_feat @ gather_no_grad(text_feat).T / temp
        itm_logits = micro_batched_itm_logits(self.itm_logits, self.micro_batches, len(input_ids))
        return itm_with_hard_negatives(itm_logits, input_ids, attention_mask, index, image_tokens, sim_t2i, sim_i2t,
                                       text_hidden if self.reuses_text_pass else None)

    # ------------------------------------------------- once per optimizer step
    @torch.no_grad()
    def momentum_update(self, applied: Tensor | None = None) -> None:
        """EMA of every momentum copy toward its online module (each tied tensor once), as
        two multi-tensor (foreach) kernels over all copies rather than two per tensor.
        Under FSDP both are sharded alike, so each rank updates its own shard.
        ``applied`` (0-d bool, from a step skipped on the device): where False the copies
        stay as they are."""
        seen: set[int] = set()
        twins: list[Tensor] = []
        onlines: list[Tensor] = []
        for online, twin in self.momentum_pairs:
            for p_twin, p in zip(getattr(self, twin).parameters(), getattr(self, online).parameters(), strict=True):
                if id(p_twin) not in seen:
                    seen.add(id(p_twin))
                    twins.append(local_tensor(p_twin))
                    onlines.append(local_tensor(p.detach()))
        if applied is None:
            torch._foreach_mul_(twins, self.momentum)
            torch._foreach_add_(twins, onlines, alpha=1 - self.momentum)
            return
        pull = applied.float() * (1 - self.momentum)  # 0-d: 1 - momentum, or 0 for a skipped step
        torch._foreach_mul_(twins, 1 - pull)
        torch._foreach_add_(twins, torch._foreach_mul(onlines, pull))

    @torch.no_grad()
    def enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, index: Tensor, applied: Tensor | None = None
                ) -> None:
        """Add this rank's momentum features (B, D), (B, D) and ids (B,) — all-gathered
        from every rank, in rank order — to the queue (identical on every rank); see
        :meth:`FeatureQueue.enqueue` for ``applied``."""
        self.queue.enqueue(gather_no_grad(image_feat_m), gather_no_grad(text_feat_m), gather_no_grad(index), applied)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(*self.temperature_range)

    def no_weight_decay(self) -> set[str]:
        names = {"temp"}
        names |= {f"vision.{n}" for n in self.vision.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names
