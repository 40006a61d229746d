"""Model-agnostic autoregressive decoding: greedy, beam search and nucleus sampling.

The model is reached only through a ``next_logits(ids, rows)`` callable, so the same
code serves BLIP's image-grounded decoder and BLIP-2's Q-Former captioner. Every step
re-runs ``next_logits`` on the whole sequence (no KV cache; a caller that wants one can
keep it behind the callable).

Shapes: B batch rows, K beams, P prefix length, V vocabulary, L = ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.distributed import is_distributed

NextTokenLogits = Callable[[Tensor, Tensor], Tensor]
"""next_logits(ids (R, T) long, rows (R,) long) -> (R, V) float logits of the token after ids.

``rows[r]`` is the original batch row that sequence r belongs to (pick its image context
with ``context[rows]``); with beams one batch row owns several sequences.
"""

METHODS = ("greedy", "beam", "nucleus")


_lockstep = False


def set_generation_lockstep(enabled: bool) -> None:
    """Decode in lockstep over ranks (every rank runs as many steps as the slowest), as a
    sharded (FSDP) model needs: each of its forwards is collective."""
    global _lockstep
    _lockstep = enabled


def generation_in_lockstep() -> bool:
    return _lockstep and is_distributed()


def done_everywhere(done: Tensor) -> bool:
    """Whether every row is done: here, or in lockstep on every rank."""
    if not generation_in_lockstep():
        return bool(done.all())
    flag = done.all().float().reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)

@dataclass
class GenerationConfig:
    """Decoding settings.

    ``max_length`` and ``min_length`` count new tokens (the prefix excluded); EOS cannot be
    produced while fewer than ``min_length`` new tokens exist. ``temperature`` and ``top_p``
    apply to nucleus sampling only. ``repetition_penalty`` > 1 discourages tokens already in
    the sequence, prefix included (CTRL-style: positive logits divided, negative multiplied).
    A beam hypothesis scores ``sum(logprob) / length ** length_penalty``, length counting its
    new tokens including EOS.
    """

    method: str = "beam"
    max_length: int = 30
    min_length: int = 5
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@torch.no_grad()
def generate(
    next_logits: NextTokenLogits,
    prefix: Tensor,
    eos_id: int,
    pad_id: int,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Decode new tokens after ``prefix``.

    prefix: (B, P) long, the same length for every row (e.g. [DEC] + prompt tokens).
    Returns (B, T) long, T <= ``config.max_length``: the new tokens only, each row ending at
    its EOS (kept) and right-padded with ``pad_id``. A row that never reached EOS holds
    ``max_length`` tokens. ``pad_id`` is never generated. ``generator`` (on the logits'
    device) drives nucleus sampling. ``config`` defaults to ``GenerationConfig()`` (beam
    search, 3 beams).
    """
    config = config if config is not None else GenerationConfig()
    if prefix.dim() != 2:
        raise ValueError(f"prefix must be (B, P), got shape {tuple(prefix.shape)}")
    prefix = prefix.long()
    if config.max_length <= 0:
        return prefix.new_empty(prefix.shape[0], 0)
    if config.method == "beam":
        return _beam_search(next_logits, prefix, eos_id, pad_id, config)
    if config.method == "greedy":
        pick: Callable[[Tensor], Tensor] = _argmax
    else:
        pick = _nucleus_picker(config.top_p, config.temperature, generator)
    return _decode_rows(next_logits, prefix, eos_id, pad_id, config, pick)


# ----------------------------------------------------------------------------- logits


def _process_logits(
    logits: Tensor, ids: Tensor, step: int, eos_id: int, pad_id: int, config: GenerationConfig
) -> Tensor:
    """logits (R, V) for sequences ids (R, T) with ``step`` new tokens so far -> (R, V) float32.

    Applies the repetition penalty, forbids ``pad_id`` and forbids EOS before ``min_length``.
    Returns a new tensor; the caller's logits are left untouched.
    """
    logits = logits.to(torch.float32, copy=True)
    if config.repetition_penalty != 1.0:
        _penalise_repeats(logits, ids, config.repetition_penalty)
    if pad_id != eos_id:
        logits[:, pad_id] = float("-inf")
    if step < config.min_length:
        logits[:, eos_id] = float("-inf")
    return logits


def _penalise_repeats(logits: Tensor, ids: Tensor, penalty: float) -> None:
    """In place on logits (R, V): CTRL penalty on every token present in ids (R, T)."""
    seen = logits.gather(1, ids)
    logits.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def _argmax(logits: Tensor) -> Tensor:
    """logits (R, V) -> (R,) most likely token."""
    return logits.argmax(dim=-1)


def _nucleus_picker(
    top_p: float, temperature: float, generator: torch.Generator | None
) -> Callable[[Tensor], Tensor]:
    """A picker sampling (R,) tokens from logits (R, V) within the top-p nucleus."""

    def pick(logits: Tensor) -> Tensor:
        probs = F.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(1, choice).squeeze(1)

    return pick


# ------------------------------------------------------------------ greedy / nucleus


def _decode_rows(
    next_logits: NextTokenLogits,
    prefix: Tensor,
    eos_id: int,
    pad_id: int,
    config: GenerationConfig,
    pick: Callable[[Tensor], Tensor],
) -> Tensor:
    """One sequence per row, one ``pick``ed token per step. prefix (B, P) -> (B, T).

    Only unfinished rows are passed to ``next_logits``; finished rows receive ``pad_id``.
    Stops once every row has produced EOS or after ``max_length`` steps.
    """
    batch = prefix.shape[0]
    ids = prefix
    finished = torch.zeros(batch, dtype=torch.bool, device=prefix.device)
    new_tokens = []
    for step in range(config.max_length):
        active = (~finished).nonzero().squeeze(1)  # may be empty here while another rank decodes on
        logits = next_logits(ids[active], active)
        logits = _process_logits(logits, ids[active], step, eos_id, pad_id, config)
        token = torch.full_like(finished, pad_id, dtype=torch.long)
        if len(active):
            token[active] = pick(logits)
        new_tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == eos_id
        if done_everywhere(finished):
            break
    return torch.stack(new_tokens, dim=1)


# ----------------------------------------------------------------------- beam search


@dataclass
class _Hypotheses:
    """The K best finished hypotheses of every row.

    scores (B, K) length-normalised (-inf marks an empty slot), lengths (B, K),
    tokens (B, K, L) right-padded with pad_id.
    """

    scores: Tensor
    lengths: Tensor
    tokens: Tensor

    @classmethod
    def empty(
        cls, batch: int, beams: int, max_length: int, pad_id: int, device: torch.device
    ) -> _Hypotheses:
        return cls(
            scores=torch.full((batch, beams), float("-inf"), device=device),
            lengths=torch.zeros(batch, beams, dtype=torch.long, device=device),
            tokens=torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device),
        )

    def count(self) -> Tensor:
        """(B,) number of finished hypotheses held per row."""
        return self.scores.isfinite().sum(dim=1)

    def add(self, scores: Tensor, lengths: Tensor, tokens: Tensor, keep: Tensor) -> None:
        """Merge candidates scores (B, N), lengths (B, N), tokens (B, N, L) where keep (B, N)."""
        beams = self.scores.shape[1]
        all_scores = torch.cat([self.scores, scores.masked_fill(~keep, float("-inf"))], dim=1)
        self.scores, best = all_scores.topk(beams, dim=1)
        self.lengths = torch.cat([self.lengths, lengths], dim=1).gather(1, best)
        all_tokens = torch.cat([self.tokens, tokens], dim=1)
        self.tokens = all_tokens.gather(1, best[..., None].expand(-1, -1, all_tokens.shape[2]))

    def best(self) -> Tensor:
        """(B, T) the top hypothesis of every row, trimmed to the longest one."""
        top = self.scores.argmax(dim=1)
        rows = torch.arange(top.shape[0], device=top.device)
        length = int(self.lengths[rows, top].max())
        return self.tokens[rows, top, :length]


def _pad_to(tokens: Tensor, length: int, pad_id: int) -> Tensor:
    """tokens (..., T) -> (..., length) right-padded with pad_id."""
    return F.pad(tokens, (0, length - tokens.shape[-1]), value=pad_id)


def _beam_search(
    next_logits: NextTokenLogits, prefix: Tensor, eos_id: int, pad_id: int, config: GenerationConfig
) -> Tensor:
    """Beam search with K = ``num_beams`` beams per row. prefix (B, P) -> (B, T).

    Sequences are row-major (row b's beams at b*K .. b*K+K-1). Each step keeps the 2K best
    continuations of a row; an EOS among its top K becomes a finished hypothesis, and the
    K best non-EOS continuations become the next beams. A row is done once it holds K
    finished hypotheses (early stopping); rows still open after ``max_length`` steps also
    consider their live beams. The best length-normalised hypothesis of each row is returned;
    with K = 1 this is exactly greedy decoding.
    """
    batch, beams, max_length = prefix.shape[0], config.num_beams, config.max_length
    device = prefix.device
    rows = torch.arange(batch, device=device).repeat_interleave(beams)
    ids = prefix.repeat_interleave(beams, dim=0)
    new_tokens = prefix.new_empty(batch * beams, 0)
    # Only beam 0 is live at the start, so the first step expands distinct tokens.
    beam_scores = torch.full((batch, beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished = _Hypotheses.empty(batch, beams, max_length, pad_id, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_length):
        logits = _process_logits(next_logits(ids, rows), ids, step, eos_id, pad_id, config)
        logprobs = F.log_softmax(logits, dim=-1).view(batch, beams, -1)
        scores, source, token = _top_candidates(beam_scores, logprobs)
        _add_finished(
            finished, scores, source, token, new_tokens, done, eos_id, pad_id, config, step
        )
        beam_scores, source, token = _next_beams(scores, source, token, eos_id, beams)
        flat = (torch.arange(batch, device=device)[:, None] * beams + source).view(-1)
        ids = torch.cat([ids[flat], token.view(-1, 1)], dim=1)
        new_tokens = torch.cat([new_tokens[flat], token.view(-1, 1)], dim=1)
        done |= finished.count() >= beams
        steps = step + 1
        if done_everywhere(done):
            break
    _add_live_beams(finished, beam_scores, new_tokens, done, steps, pad_id, config)
    return finished.best()


def _top_candidates(beam_scores: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """beam_scores (B, K), logprobs (B, K, V) -> the 2K best continuations of every row.

    Returns scores (B, 2K) summed log-probabilities (descending), source (B, 2K) the beam
    they extend, token (B, 2K) the appended token.
    """
    beams, vocab = logprobs.shape[1], logprobs.shape[2]
    totals = (beam_scores[:, :, None] + logprobs).flatten(1)
    scores, index = totals.topk(min(2 * beams, beams * vocab), dim=1)
    return scores, index // vocab, index % vocab


def _add_finished(
    finished: _Hypotheses,
    scores: Tensor,
    source: Tensor,
    token: Tensor,
    new_tokens: Tensor,
    done: Tensor,
    eos_id: int,
    pad_id: int,
    config: GenerationConfig,
    step: int,
) -> None:
    """Record EOS continuations ranked within the top K of rows that are not done yet.

    scores/source/token (B, 2K) from ``_top_candidates``; new_tokens (B*K, step) the beams'
    tokens so far.
    """
    batch, beams = done.shape[0], config.num_beams
    top_scores, top_source = scores[:, :beams], source[:, :beams]
    keep = (token[:, :beams] == eos_id) & top_scores.isfinite() & ~done[:, None]
    if not bool(keep.any()):
        return
    history = new_tokens.view(batch, beams, step)
    history = history.gather(1, top_source[..., None].expand(-1, -1, step))
    eos = torch.full_like(top_source, eos_id)[..., None]
    tokens = _pad_to(torch.cat([history, eos], dim=2), config.max_length, pad_id)
    lengths = torch.full_like(top_source, step + 1)
    normalised = top_scores / float(step + 1) ** config.length_penalty
    finished.add(normalised, lengths, tokens, keep)


def _next_beams(
    scores: Tensor, source: Tensor, token: Tensor, eos_id: int, beams: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The K best non-EOS continuations: (B, 2K) candidates -> scores, source, token (B, K)."""
    # A stable sort on is-EOS keeps the descending score order among the rest.
    order = torch.argsort((token == eos_id).long(), dim=1, stable=True)[:, :beams]
    return scores.gather(1, order), source.gather(1, order), token.gather(1, order)


def _add_live_beams(
    finished: _Hypotheses,
    beam_scores: Tensor,
    new_tokens: Tensor,
    done: Tensor,
    steps: int,
    pad_id: int,
    config: GenerationConfig,
) -> None:
    """Let rows that are not done also choose among their live beams (B, K) of ``steps`` tokens."""
    batch, beams = beam_scores.shape
    tokens = _pad_to(new_tokens.view(batch, beams, steps), config.max_length, pad_id)
    lengths = torch.full_like(tokens[:, :, 0], steps)
    normalised = beam_scores / float(max(steps, 1)) ** config.length_penalty
    finished.add(normalised, lengths, tokens, ~done[:, None].expand(-1, beams))
