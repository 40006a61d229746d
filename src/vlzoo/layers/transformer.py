"""The one BERT-style transformer block of vlzoo, and the stack built from it.

Post-LayerNorm block (self-attention -> optional cross-attention -> feed-forward) with
attention through ``scaled_dot_product_attention``. Parameter names follow Hugging
Face BERT (``attention.self.query``, ``crossattention.output.LayerNorm``,
``intermediate.dense``, ...) so BERT-family checkpoints load with a strict key check.
The same block serves the BERT text encoder, ALBEF's text+fusion layers, BLIP's MED
and the BLIP-2 Q-Former: a stack chooses which layers carry cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlzoo.layers.micro_batches import equal_parts


@dataclass
class BertConfig:
    """Sizes of a BERT-style stack (field names as in Hugging Face ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of the normal initialisation of weights


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


CAUSAL = "causal"
"""A self-attention mask meaning "causal, no padding": SDPA's ``is_causal``."""
Mask = Tensor | str | None
"""An attention mask: a boolean tensor, :data:`CAUSAL`, or None (every key)."""


class MultiHeadAttention(nn.Module):
    """Query/key/value projections and SDPA; ``key_width`` differs for cross-attention."""

    def __init__(self, width: int, heads: int, key_width: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"hidden size {width} is not divisible by {heads} attention heads")
        key_width = key_width or width
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(key_width, width)
        self.value = nn.Linear(key_width, width)

    def _split(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, D/H)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Mask = None,
        cache: AttentionCache | None = None,
    ) -> Tensor:
        """x: (B, Lq, D); context: (B, Lk, Dk) or None for self-attention;
        mask: boolean (B, 1|H, Lq, Lk), True where attention is allowed; None: every key;
        :data:`CAUSAL`: causal self-attention without padding (both let SDPA pick its
        fused kernels, which a materialised mask rules out on GPU).
        ``cache`` (incremental decoding): self-attention appends this call's keys/values to
        it and attends to all of them; cross-attention projects ``context`` on the first
        call only. Returns (B, Lq, D)."""
        if cache is not None and context is not None and cache.key is not None:
            k, v = cache.key, cache.value
        else:
            source = x if context is None else context
            k, v = self._split(self.key(source)), self._split(self.value(source))
            if cache is not None:
                if context is None and cache.key is not None:
                    k, v = torch.cat([cache.key, k], dim=2), torch.cat([cache.value, v], dim=2)
                cache.key, cache.value = k, v
        q = self._split(self.query(x))
        p = self.dropout if self.training else 0.0
        causal = isinstance(mask, str)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, dropout_p=p,
                                             is_causal=causal)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class ResidualOutput(nn.Module):
    """``LayerNorm(x + dropout(dense(h)))`` (BERT's ``*Output`` modules)."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class AttentionSublayer(nn.Module):
    """Attention plus its residual output (BERT's ``attention.self`` / ``attention.output``)."""

    def __init__(self, cfg: BertConfig, key_width: int | None = None):
        super().__init__()
        width = cfg.hidden_size
        self.self = MultiHeadAttention(width, cfg.num_attention_heads, key_width, cfg.attention_probs_dropout_prob)
        self.output = ResidualOutput(width, width, cfg.layer_norm_eps, cfg.hidden_dropout_prob)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Mask = None,
        cache: AttentionCache | None = None,
    ) -> Tensor:
        return self.output(self.self(x, context, mask, cache), x)


class FeedForwardIn(nn.Module):
    """BERT's ``intermediate``: dense + activation."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention to image tokens, feed-forward."""

    def __init__(self, cfg: BertConfig, cross_attention_width: int | None = None, query_ffn: bool = False):
        super().__init__()
        self.attention = AttentionSublayer(cfg)
        self.crossattention = (
            AttentionSublayer(cfg, key_width=cross_attention_width) if cross_attention_width else None
        )
        self.intermediate = FeedForwardIn(cfg)
        self.output = ResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)
        if query_ffn:  # the Q-Former's learned queries have a feed-forward of their own
            self.intermediate_query = FeedForwardIn(cfg)
            self.output_query = ResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps,
                                               cfg.hidden_dropout_prob)

    @property
    def has_cross_attention(self) -> bool:
        return self.crossattention is not None

    def forward(
        self,
        x: Tensor,
        mask: Mask = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        query_length: int = 0,
        cache: BlockCache | None = None,
    ) -> Tensor:
        """x: (B, L, D); mask: (B, 1, L, L) bool; context: (B, N, Dc) image tokens or
        None (text-only mode: cross-attention skipped); context_mask: (B, 1, 1, N) bool.

        query_length Q > 0 (Q-Former): the first Q positions of x are learned queries;
        only they cross-attend, and they take the ``*_query`` feed-forward.
        cache: this block's (self, cross) attention caches when decoding incrementally."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.attention(x, mask=mask, cache=self_cache)
        if not query_length:
            if context is not None and self.crossattention is not None:
                x = self.crossattention(x, context, context_mask, cross_cache)
            return self.output(self.intermediate(x), x)
        queries, text = x[:, :query_length], x[:, query_length:]
        if context is not None and self.crossattention is not None:
            queries = self.crossattention(queries, context, context_mask)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.output(self.intermediate(text), text)], dim=1)


class TransformerStack(nn.Module):
    """``layer.{i}`` blocks; ``cross_attention_layers`` picks which carry cross-attention."""

    def __init__(
        self,
        cfg: BertConfig,
        cross_attention_width: int | None = None,
        cross_attention_layers: Sequence[int] = (),
        query_ffn: bool = False,
    ):
        super().__init__()
        cross = set(cross_attention_layers)
        bad = [i for i in cross if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} outside 0..{cfg.num_hidden_layers - 1}")
        self.layer = nn.ModuleList(
            TransformerBlock(cfg, cross_attention_width if i in cross else None, query_ffn)
            for i in range(cfg.num_hidden_layers)
        )
        self.grad_checkpointing = False

    def forward(
        self,
        x: Tensor,
        mask: Mask = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        layers: slice = slice(None),
        query_length: int = 0,
        cache: DecodeCache | None = None,
    ) -> Tensor:
        """Run ``self.layer[layers]`` over x (B, L, D); returns (B, L, D).
        ``query_length``: see :meth:`TransformerBlock.forward`; ``cache``: the stack's
        caches when decoding incrementally (x then holds the positions not yet cached)."""
        blocks = self.layer[layers]
        caches = cache.blocks[layers] if cache is not None else [None] * len(blocks)
        for block, block_cache in zip(blocks, caches, strict=True):
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, context, context_mask, query_length, use_reentrant=False)
            else:
                x = block(x, mask, context, context_mask, query_length, block_cache)
        return x


class AttentionCache:
    """The keys and values (R, H, T, D/H) one attention has seen while decoding one token
    at a time: self-attention's grow by each call's tokens, cross-attention's are the
    image (or question) tokens' projections, made on the first call."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    def select(self, index: Tensor) -> None:
        """Keep the sequences ``index`` (R',) long, in that order (a beam search's reordering)."""
        if self.key is not None:
            self.key, self.value = self.key[index], self.value[index]


BlockCache = tuple[AttentionCache, AttentionCache]
"""One block's (self-attention, cross-attention) caches."""


class DecodeCache:
    """The attention caches of every block of a :class:`TransformerStack` for incremental
    decoding: each call runs only the new positions, whose keys and values join those
    already seen. The result equals re-running the whole sequence (causal attention: earlier
    positions never read later ones)."""

    def __init__(self, layers: int):
        self.blocks: list[BlockCache] = [(AttentionCache(), AttentionCache()) for _ in range(layers)]

    def select(self, index: Tensor) -> None:
        """Keep the sequences ``index`` (R',) long, in that order."""
        for self_cache, cross_cache in self.blocks:
            self_cache.select(index)
            cross_cache.select(index)


def decode_cached(
    embeddings: BertEmbeddings,
    stack: TransformerStack,
    input_ids: Tensor,
    cache: DecodeCache,
    seen: int,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    keys_before: int = 0,
) -> Tensor:
    """One incremental decoding call of ``stack``: text ids (R, t) at positions ``seen`` ...
    after the ``seen`` text tokens (all real) and ``keys_before`` other keys (the Q-Former's
    queries) whose keys and values ``cache`` holds -> hidden states (R, t, D)."""
    hidden = embeddings(input_ids, position_offset=seen)
    mask = decode_mask(input_ids.shape[1], keys_before + seen, input_ids.device)
    return stack(hidden, mask, context, context_mask, cache=cache)


def decode_mask(new: int, seen: int, device: torch.device | None = None) -> Mask:
    """Causal self-attention mask (1, 1, new, seen + new) of ``new`` tokens after ``seen``
    cached ones; None for a single token, which sees every key; :data:`CAUSAL` with nothing
    cached."""
    if new == 1:
        return None
    if seen == 0:
        return CAUSAL
    return torch.ones(new, seen + new, dtype=torch.bool, device=device).tril(seen)[None, None]


class BertEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor | None, token_type_ids: Tensor | None = None, prefix: Tensor | None = None,
        position_offset: int = 0,
    ) -> Tensor:
        """input_ids: (B, L) -> (B, L, D). ``prefix`` (B, Q, D) (the Q-Former's queries,
        no position embedding) goes before the text, under the same LayerNorm:
        -> (B, Q + L, D); ``input_ids`` may then be None (queries alone).
        ``position_offset``: the position of the first id (incremental decoding)."""
        if input_ids is None:
            if prefix is None:
                raise ValueError("BertEmbeddings needs input_ids or a prefix")
            return self.dropout(self.LayerNorm(prefix))
        positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings(types)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        return self.dropout(self.LayerNorm(x))


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) linear and embedding weights, zero biases,
    unit LayerNorms. Apply with ``module.apply(partial(init_bert_weights, std=...))``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------ length buckets
RowsRun = Callable[[Tensor, "Tensor | None", "Tensor | None", "Tensor | None"], Tensor]
"""run(hidden (b, l, D), attention_mask (b, l) or None (no padding), context (b, N, Dc)
or None, context_mask (b, 1, 1, N) or None) -> (b, l, D'): a per-sequence pass."""


def run_by_length(
    run: RowsRun,
    hidden: Tensor,
    attention_mask: Tensor,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
    buckets: int = 1,
) -> Tensor:
    """``run`` over the rows grouped by text length (``buckets`` groups of about equal
    size), each group cut to its longest text: fewer FLOPs than one call padded to the
    batch's longest, and the same result at every real position (each row sees only its
    own keys, and pads never reach a real position under a padding or causal mask).

    hidden: (B, L, D); attention_mask: (B, L), 1 for the text, 0 for the padding after it;
    context, context_mask: per row, or None. Returns (B, L, D'); positions after a
    group's longest text are zeros (the padded call leaves unused values there). A group
    whose texts are all of one length is run with ``attention_mask`` None (no padding: the
    callee can leave attention unmasked).
    Reads the B lengths on the host (one synchronisation on a GPU); ``buckets`` 1, a
    mask that is not right padding, or equal lengths: one call.
    """
    b, length = attention_mask.shape
    if buckets <= 1 or b < 2:
        return run(hidden, attention_mask, context, context_mask)
    real = attention_mask.bool()  # 1/0 of any dtype (a float mask too)
    lengths = real.sum(1)
    positions = torch.arange(length, device=attention_mask.device)
    right_padded = (real == (positions[None] < lengths[:, None])).all()
    order = lengths.argsort(stable=True)
    host = torch.cat([lengths[order], right_padded.long()[None]]).tolist()  # one read: sorted lengths, the check
    if not host[-1] or host[0] == host[b - 1]:
        return run(hidden, None if host[-1] and host[0] == length else attention_mask, context, context_mask)
    parts, start = [], 0
    for size in equal_parts(b, buckets):
        rows, top = order[start:start + size], max(host[start + size - 1], 1)
        unpadded = host[start] == top
        part = run(hidden[rows, :top], None if unpadded else attention_mask[rows, :top],
                   None if context is None else context[rows], None if context_mask is None else context_mask[rows])
        parts.append(F.pad(part, (0, 0, 0, length - top)))
        start += size
    return torch.cat(parts)[order.argsort()]


def right_pad(ids: Tensor, length: int, value: int = 0) -> Tensor:
    """(..., T) token ids or a padding mask -> (..., ``length``), right-padded with ``value``."""
    return F.pad(ids, (0, length - ids.shape[-1]), value=value)


# ------------------------------------------------------------------------ mask builders


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, L) 1/0 -> (B, 1, 1, L) bool: every query may attend to every real key
    (None, no padding: None)."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """(1, 1, L, L) bool lower-triangular mask."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def causal_padding_mask(attention_mask: Tensor | None) -> Mask:
    """(B, L) -> (B, 1, L, L): causal and padding combined (None, no padding: :data:`CAUSAL`)."""
    if attention_mask is None:
        return CAUSAL
    return causal_mask(attention_mask.shape[1], attention_mask.device) & padding_mask(attention_mask)


QFORMER_MASKS = ("unimodal", "bidirectional", "causal")


def qformer_mask(num_queries: int, attention_mask: Tensor, kind: str) -> Tensor:
    """Self-attention mask over ``[queries; text]`` for the Q-Former's three tasks.

    attention_mask: (B, L) text padding mask. Returns (B, 1, Q+L, Q+L) bool, True = attend.

    - ``unimodal`` (ITC): queries see queries, text sees text; neither sees the other.
    - ``bidirectional`` (ITM): everything sees everything (except text padding).
    - ``causal`` (ITG): queries see queries; text sees all queries and earlier text.
    """
    if kind not in QFORMER_MASKS:
        raise ValueError(f"Q-Former mask kind must be one of {QFORMER_MASKS}, got {kind!r}")
    b, length = attention_mask.shape
    q, device = num_queries, attention_mask.device
    keys_real = torch.cat([torch.ones(b, q, dtype=torch.bool, device=device), attention_mask.bool()], dim=1)
    mask = keys_real[:, None, None, :].expand(b, 1, q + length, q + length).clone()
    if kind == "unimodal":
        mask[:, :, :q, q:] = False
        mask[:, :, q:, :q] = False
    elif kind == "causal":
        mask[:, :, :q, q:] = False
        mask[:, :, q:, q:] &= causal_mask(length, device)
    return mask


class LMHeadTransform(nn.Module):
    """BERT's ``predictions.transform``: dense, activation, LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class LMHead(nn.Module):
    """Token prediction head (BERT's ``cls.predictions``): transform, then a decoder
    whose weight is tied to the word embeddings. Used for MLM (ALBEF), LM (BLIP) and
    ITG (Q-Former). (B, L, D) -> (B, L, V)."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = LMHeadTransform(cfg)
        self.transform.apply(partial(init_bert_weights, std=cfg.initializer_range))
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


def share_all_but_self_attention(decoder: TransformerStack, encoder: TransformerStack) -> None:
    """Make ``decoder`` use ``encoder``'s cross-attention and feed-forward modules (the
    same objects, one set of parameters); only ``attention`` (self-attention) stays
    the decoder's own. BLIP's MED encoder/decoder sharing."""
    if len(decoder.layer) != len(encoder.layer):
        raise ValueError(f"decoder has {len(decoder.layer)} layers, encoder {len(encoder.layer)}")
    for dec, enc in zip(decoder.layer, encoder.layer, strict=True):
        dec.crossattention = enc.crossattention
        dec.intermediate = enc.intermediate
        dec.output = enc.output
