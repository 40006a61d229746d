"""Model-agnostic autoregressive decoding: greedy, beam search and nucleus sampling.

The model is reached only through a ``next_logits(ids, rows)`` callable, so the same
code serves BLIP's image-grounded decoder and BLIP-2's Q-Former captioner. A plain
callable re-runs the whole sequence every step; a :class:`CachedNextLogits` keeps every
attention's keys and values and runs only the new token (``GenerationConfig.use_cache``).

Shapes: B batch rows, K beams, P prefix length, V vocabulary, L = ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.distributed import is_distributed
from vlzoo.layers.transformer import DecodeCache, right_pad

NextTokenLogits = Callable[[Tensor, Tensor], Tensor]
"""next_logits(ids (R, T) long, rows (R,) long) -> (R, V) float logits of the token after ids.

``rows[r]`` is the original batch row that sequence r belongs to (pick its image context
with ``context[rows]``); with beams one batch row owns several sequences.
"""

METHODS = ("greedy", "beam", "nucleus")

DecodeStep = Callable[[Tensor, Tensor, DecodeCache, int], Tensor]
"""step(new_ids (R, t), rows (R,), cache, seen) -> (R, t, V) logits of the ``t`` positions
after the ``seen`` ones whose keys and values ``cache`` holds (``seen`` 0: the prefix)."""


class CachedNextLogits:
    """A :data:`NextTokenLogits` over a decoder with a key/value cache (:class:`DecodeCache`).

    The first call runs the whole prefix; every later call runs only the token appended
    since, after :func:`generate` has told :meth:`select` which earlier sequence each current
    one continues. The logits equal those of re-running the whole sequence (causal
    self-attention) up to float rounding.
    """

    def __init__(self, step: DecodeStep, layers: int):
        self.step, self.layers = step, layers
        self.cache: DecodeCache | None = None
        self.seen = 0

    def __call__(self, ids: Tensor, rows: Tensor) -> Tensor:
        if self.cache is None:
            self.cache = DecodeCache(self.layers)
        logits = self.step(ids[:, self.seen:], rows, self.cache, self.seen)
        self.seen = ids.shape[1]
        return logits[:, -1]

    def select(self, parents: Tensor) -> None:
        """parents (R',) long: the previous call's sequence each sequence of the next call extends."""
        if self.cache is not None:
            self.cache.select(parents)


def _continue_from(next_logits: NextTokenLogits, parents: Tensor) -> None:
    """Tell a cached ``next_logits`` (one with ``select``) which sequences go on."""
    if isinstance(next_logits, CachedNextLogits):
        next_logits.select(parents)


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
    new tokens including EOS. ``early_stopping`` (beam search): as transformers' (False: stop
    a row when no live beam can beat its finished ones; True: at ``num_beams`` finished;
    ``"never"``). ``use_cache``: models with a key/value cache decode one new token a step
    (the same tokens as re-running the sequence, far fewer FLOPs).
    """

    method: str = "beam"
    max_length: int = 30
    min_length: int = 5
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
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
    ``max_length`` tokens. Greedy and beam search give transformers' ``generate`` tokens for
    the same settings (``max_new_tokens``, ``min_new_tokens``). ``generator`` (on the logits'
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
    logits: Tensor, ids: Tensor, step: int, eos_id: int, config: GenerationConfig
) -> Tensor:
    """logits (R, V) for sequences ids (R, T) with ``step`` new tokens so far -> (R, V) float32.

    Applies the repetition penalty and forbids EOS before ``min_length`` (transformers'
    ``RepetitionPenaltyLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor``; like
    transformers, no other token is forbidden). Returns a new tensor; the caller's logits
    are left untouched.
    """
    logits = logits.to(torch.float32, copy=True)
    if config.repetition_penalty != 1.0:
        _penalise_repeats(logits, ids, config.repetition_penalty)
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
    new_tokens, previous = [], None
    for step in range(config.max_length):
        active = (~finished).nonzero().squeeze(1)  # may be empty here while another rank decodes on
        if previous is not None:
            _continue_from(next_logits, torch.searchsorted(previous, active))
        previous = active
        logits = next_logits(ids[active], active)
        logits = _process_logits(logits, ids[active], step, eos_id, config)
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
_NEG = -1.0e9  # the finite "impossible" score transformers' beam search adds (so ties and sums match it)


@dataclass
class _Beams:
    """Beam-search state of B rows with K beams each; T new tokens so far.

    running (B, K) summed log-probabilities of the live beams (best first), tokens (B, K, T)
    their new tokens; finished (B, K) length-normalised scores of the best finished
    hypotheses (``_NEG``-shifted where empty), finished_tokens (B, K, L) right-padded,
    finished_len (B, K), is_finished (B, K); improvable (B,) whether a live beam can still
    beat the finished ones.
    """

    running: Tensor
    tokens: Tensor
    finished: Tensor
    finished_tokens: Tensor
    finished_len: Tensor
    is_finished: Tensor
    improvable: Tensor
    pad_id: int


def _beam_search(
    next_logits: NextTokenLogits, prefix: Tensor, eos_id: int, pad_id: int, config: GenerationConfig
) -> Tensor:
    """Beam search with K = ``num_beams`` beams per row, step for step as transformers'
    ``generate(num_beams=K, do_sample=False)``: the logits processors act on log-probabilities;
    each step keeps the 2K best continuations; those among the top K that end in EOS, or reach
    ``max_length``, become finished hypotheses scored ``sum / new_length ** length_penalty``;
    the K best others stay live. ``early_stopping``: True stops a row at K finished hypotheses,
    False (transformers' and BLIP's default) once the best live beam at its current length
    cannot beat the worst finished one, ``"never"`` as False but with a positive length
    penalty judged at ``max_length``. prefix (B, P) -> (B, T) the best hypothesis per row."""
    batch, beams, max_length = prefix.shape[0], config.num_beams, config.max_length
    device = prefix.device
    rows = torch.arange(batch, device=device).repeat_interleave(beams)
    prefixes = prefix.repeat_interleave(beams, dim=0)  # (B*K, P)
    ids = prefixes  # (B*K, P + T)
    state = _Beams(
        running=torch.cat([torch.zeros(batch, 1, device=device), torch.full((batch, beams - 1), _NEG, device=device)],
                          dim=1),
        tokens=prefix.new_empty(batch, beams, 0),
        finished=torch.full((batch, beams), _NEG, device=device),
        finished_tokens=torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device),
        finished_len=torch.zeros(batch, beams, dtype=torch.long, device=device),
        is_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
        improvable=torch.ones(batch, dtype=torch.bool, device=device),
        pad_id=pad_id,
    )
    firsts = torch.arange(batch, device=device)[:, None] * beams  # (B, 1) each row's first sequence
    for step in range(max_length):
        logprobs = F.log_softmax(next_logits(ids, rows).to(torch.float32), dim=-1)
        logprobs = _process_logits(logprobs, ids, step, eos_id, config)
        scores, source, token = _top_candidates(state.running, logprobs.view(batch, beams, -1))
        candidates = torch.cat([state.tokens.gather(1, source[..., None].expand(-1, -1, step)), token[..., None]], 2)
        ends = (token == eos_id) | (step + 1 == max_length)  # (B, 2K): transformers' stopping criteria
        _add_finished(state, scores, candidates, ends, config, step)
        live = scores + ends.float() * _NEG  # an ended candidate cannot go on
        keep = live.topk(beams, dim=1).indices
        state.running = live.gather(1, keep)
        _continue_from(next_logits, (firsts + source.gather(1, keep)).flatten())
        state.tokens = candidates.gather(1, keep[..., None].expand(-1, -1, step + 1))
        ids = torch.cat([prefixes, state.tokens.flatten(0, 1)], dim=1)
        state.improvable &= _can_improve(state, step + 1, config)
        full = state.is_finished.all(dim=1) & (config.early_stopping is True)
        if done_everywhere(~state.improvable | full) or bool(ends.all()):
            break
    return _best(state)


def _top_candidates(running: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """running (B, K), logprobs (B, K, V) -> the 2K best continuations of every row: scores
    (B, 2K) summed log-probabilities (descending), source (B, 2K) the beam they extend,
    token (B, 2K) the appended token."""
    beams, vocab = logprobs.shape[1], logprobs.shape[2]
    totals = (logprobs + running[:, :, None]).flatten(1)
    scores, index = totals.topk(min(2 * beams, beams * vocab), dim=1)
    return scores, index // vocab, index % vocab


def _add_finished(state: _Beams, scores: Tensor, candidates: Tensor, ends: Tensor, config: GenerationConfig,
                  step: int) -> None:
    """Merge the ending candidates among the top K of each row (scores (B, 2K), candidates
    (B, 2K, step + 1), ends (B, 2K)) into the K best finished hypotheses."""
    beams = config.num_beams
    top = torch.zeros_like(ends)
    top[:, :beams] = True
    new = ends & top
    normalised = scores / float(step + 1) ** config.length_penalty
    full = state.is_finished.all(dim=1, keepdim=True) & (config.early_stopping is True)
    normalised = normalised + full.float() * _NEG + (~state.improvable[:, None]).float() * _NEG
    normalised = normalised + (~new).float() * _NEG
    padded = right_pad(candidates, config.max_length, state.pad_id)
    merged = torch.cat([state.finished, normalised], dim=1)
    best = merged.topk(beams, dim=1).indices
    state.finished = merged.gather(1, best)
    all_tokens = torch.cat([state.finished_tokens, padded], dim=1)
    state.finished_tokens = all_tokens.gather(1, best[..., None].expand(-1, -1, all_tokens.shape[2]))
    lengths = torch.cat([state.finished_len, torch.full_like(scores, step + 1, dtype=torch.long)], dim=1)
    state.finished_len = lengths.gather(1, best)
    state.is_finished = torch.cat([state.is_finished, new], dim=1).gather(1, best)


def _can_improve(state: _Beams, length: int, config: GenerationConfig) -> Tensor:
    """(B,) whether the best live beam (``length`` new tokens) may still beat the worst finished
    hypothesis (transformers' early-stop heuristic)."""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        length = config.max_length
    best_possible = state.running[:, :1] / float(length) ** config.length_penalty
    worst = torch.where(state.is_finished, state.finished.min(dim=1, keepdim=True).values, _NEG)
    return (best_possible > worst).any(dim=1)


def _best(state: _Beams) -> Tensor:
    """(B, T) the best finished hypothesis of every row, trimmed to the longest one."""
    length = int(state.finished_len[:, 0].max())
    return state.finished_tokens[:, 0, :length]

