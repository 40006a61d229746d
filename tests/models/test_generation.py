"""Autoregressive decoding on toy bigram models whose answers can be worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from vlzoo.models.generation import GenerationConfig, generate

PAD, BOS, EOS, A, B, C, D, E = range(8)
VOCAB = 8


def bigram(spec: dict[int, dict[int, float]]) -> Tensor:
    """(V, V) transition probabilities; rows not in spec go straight to EOS."""
    probs = torch.zeros(VOCAB, VOCAB)
    probs[:, EOS] = 1.0
    for prev, nexts in spec.items():
        probs[prev] = 0.0
        for token, p in nexts.items():
            probs[prev, token] = p
    return probs


# Greedy is myopic here: BOS->A (0.5) looks best, but A spreads its mass, whereas
# BOS->B (0.4) -> EOS (0.95) is the most probable caption.
MYOPIC = bigram(
    {
        BOS: {A: 0.5, B: 0.4, C: 0.1},
        A: {C: 0.3, D: 0.26, E: 0.24, EOS: 0.2},
        B: {EOS: 0.95, D: 0.05},
        C: {EOS: 0.9, A: 0.1},
    }
)


class Bigram:
    """next_logits from per-row bigram tables; checks and records what it is called with.

    probs: (V, V) shared by every row, or (N, V, V) one table per batch row.
    """

    def __init__(self, probs: Tensor, expected_rows: Tensor | None = None) -> None:
        self.logits = probs.log()
        self.expected_rows = expected_rows
        self.calls: list[Tensor] = []

    def __call__(self, ids: Tensor, rows: Tensor) -> Tensor:
        assert ids.dtype == torch.long and rows.dtype == torch.long
        assert ids.dim() == 2 and rows.shape == (ids.shape[0],)
        assert not torch.is_grad_enabled()
        if self.expected_rows is not None:
            assert torch.equal(rows, self.expected_rows)
        self.calls.append(rows.clone())
        if self.logits.dim() == 2:
            return self.logits[ids[:, -1]]
        return self.logits[rows, ids[:, -1]]


def random_tables(seed: int, rows: int) -> Tensor:
    """(rows, V, V) random bigram tables that never emit PAD or BOS."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, VOCAB, generator=gen) * 2.0
    logits[..., [PAD, BOS]] = float("-inf")
    return logits.softmax(dim=-1)


def run(model: Bigram, prefix: list[list[int]], **config: object) -> Tensor:
    return generate(model, torch.tensor(prefix), EOS, PAD, GenerationConfig(**config))


def test_greedy_follows_argmax_and_pads_finished_rows() -> None:
    model = Bigram(MYOPIC)
    out = run(model, [[BOS], [C]], method="greedy", min_length=0)
    # Row 0: BOS -> A -> C -> EOS; row 1: C -> EOS, then padded.
    assert out.tolist() == [[A, C, EOS], [EOS, PAD, PAD]]
    assert out.dtype == torch.long
    # Finished rows are no longer decoded, and decoding stops once all rows are done.
    assert [rows.tolist() for rows in model.calls] == [[0, 1], [0], [0]]


def test_greedy_truncates_at_max_length_without_eos() -> None:
    loop = bigram({BOS: {A: 0.6, B: 0.4}, A: {A: 0.5, EOS: 0.3, B: 0.2}})
    out = run(Bigram(loop), [[BOS]], method="greedy", min_length=0, max_length=4)
    assert out.tolist() == [[A, A, A, A]]


def test_repetition_penalty_discourages_repeats() -> None:
    loop = bigram({BOS: {A: 0.6, B: 0.4}, A: {A: 0.5, EOS: 0.3, B: 0.2}})
    # Log-probabilities are negative, so the penalty multiplies them: A->A becomes
    # 2 * log 0.5 = -1.39 < log 0.3 = -1.20, and EOS wins.
    out = run(Bigram(loop), [[BOS]], method="greedy", min_length=0, repetition_penalty=2.0)
    assert out.tolist() == [[A, EOS]]


def test_beam_beats_myopic_greedy() -> None:
    prefix = [[BOS]]
    greedy = run(Bigram(MYOPIC), prefix, method="greedy", min_length=0)
    beam = run(Bigram(MYOPIC), prefix, method="beam", num_beams=3, min_length=0)
    assert greedy.tolist() == [[A, C, EOS]]  # p = 0.5 * 0.3 * 0.9 = 0.135
    assert beam.tolist() == [[B, EOS]]  # p = 0.4 * 0.95 = 0.38
    assert math.log(0.38) / 2 > math.log(0.135) / 3


def test_beam_rows_map_sequences_to_their_batch_row() -> None:
    other = MYOPIC.clone()
    other[BOS] = 0.0
    other[BOS, [A, B, C]] = torch.tensor([0.3, 0.1, 0.6])  # row 1 prefers C -> EOS
    tables = torch.stack([MYOPIC, other])
    beams = 3
    expected_rows = torch.arange(2).repeat_interleave(beams)  # row-major: 0 0 0 1 1 1
    model = Bigram(tables, expected_rows=expected_rows)
    out = run(model, [[BOS], [BOS]], method="beam", num_beams=beams, min_length=0)
    assert out.tolist() == [[B, EOS], [C, EOS]]
    assert model.calls  # the callable (and its row check) really ran
    for row in range(2):
        alone = Bigram(tables[row : row + 1])
        single = run(alone, [[BOS]], method="beam", num_beams=beams, min_length=0)
        assert single.tolist() == out[row : row + 1].tolist()


def test_beam_pads_shorter_rows() -> None:
    out = run(Bigram(MYOPIC), [[BOS], [C]], method="beam", num_beams=3, min_length=0)
    assert out.tolist() == [[B, EOS], [EOS, PAD]]


@pytest.mark.parametrize("seed", [1, 5, 7])  # tables whose best caption varies with the penalty
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_exhaustive_best(seed: int, length_penalty: float) -> None:
    # With more beams than sequences, beam search must return the best length-normalised
    # sequence among all EOS-terminated ones and the unfinished ones of max_length.
    max_length, words = 4, [A, B, C, D, E]
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=gen) * 2.0
    logits[:, [PAD, BOS]] = float("-inf")
    logits[BOS, EOS] = float("-inf")  # no empty caption
    probs = logits.softmax(dim=-1)

    def score(seq: tuple[int, ...]) -> float:
        tokens = (BOS, *seq)
        logprob = sum(math.log(probs[a, b]) for a, b in itertools.pairwise(tokens))
        return logprob / len(seq) ** length_penalty

    candidates = [
        (*body, EOS) for n in range(1, max_length) for body in itertools.product(words, repeat=n)
    ] + list(itertools.product(words, repeat=max_length))
    best = max(candidates, key=score)
    out = run(
        Bigram(probs),
        [[BOS]],
        method="beam",
        num_beams=1000,
        min_length=0,
        max_length=max_length,
        length_penalty=length_penalty,
    )
    assert out.tolist() == [list(best)]


@pytest.mark.parametrize("seed", range(4))
def test_single_beam_equals_greedy(seed: int) -> None:
    tables = random_tables(seed, rows=4)
    prefix = [[BOS, A], [BOS, B], [BOS, C], [BOS, D]]
    settings = dict(min_length=2, max_length=7, repetition_penalty=1.3)
    greedy = run(Bigram(tables), prefix, method="greedy", **settings)
    beam = run(Bigram(tables), prefix, method="beam", num_beams=1, **settings)
    assert torch.equal(greedy, beam)


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
@pytest.mark.parametrize("min_length", [0, 1, 2, 3])
def test_min_length_delays_eos(method: str, min_length: int) -> None:
    # EOS is always the most likely next token, so only min_length holds it back.
    eager = bigram(
        {
            BOS: {EOS: 0.6, A: 0.4},
            A: {EOS: 0.7, C: 0.3},
            C: {EOS: 0.8, D: 0.2},
            D: {EOS: 0.9, E: 0.1},
        }
    )
    config = dict(method=method, min_length=min_length, num_beams=2, top_p=1e-6)
    out = run(Bigram(eager), [[BOS]], **config)
    assert out.tolist() == [[A, C, D][:min_length] + [EOS]]


def test_pad_is_generated_when_likeliest_as_transformers_does() -> None:
    padded = bigram({BOS: {PAD: 0.7, A: 0.3}})
    out = run(Bigram(padded), [[BOS]], method="greedy", min_length=0, max_length=2)
    assert out.tolist() == [[PAD, EOS]]


def tiny_causal_lm(seed: int, vocab: int = 12):
    """A random transformers GPT-2 whose small vocabulary makes EOS and ties of beams likely."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=BOS,
                        eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharper distributions: beams diverge and finish at different lengths
        model.lm_head.weight.mul_(6.0)
    return model


SETTINGS = [  # (num_beams, max_new, min_new, repetition_penalty, length_penalty, early_stopping)
    (1, 8, 0, 1.0, 1.0, False), (1, 8, 3, 1.3, 1.0, False), (2, 8, 0, 1.0, 1.0, False),
    (3, 10, 2, 1.0, 1.0, False), (3, 10, 0, 1.5, 1.0, False), (3, 10, 0, 1.0, 0.6, False),
    (3, 10, 1, 1.0, 2.0, "never"), (4, 9, 0, 1.0, -0.5, False), (3, 10, 0, 1.0, 1.0, True),
    (5, 12, 5, 1.2, 1.0, False),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
@pytest.mark.parametrize("seed", range(2))
@torch.no_grad()
def test_tokens_equal_transformers_generate(seed: int, setting: tuple) -> None:
    """Greedy and beam search give transformers' generate tokens under the same settings."""
    beams, max_new, min_new, repetition, length_penalty, early_stopping = setting
    model = tiny_causal_lm(seed)
    prefix = torch.tensor([[BOS, A], [BOS, C], [BOS, E]])
    expected = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False, num_beams=beams,
                              max_new_tokens=max_new, min_new_tokens=min_new, repetition_penalty=repetition,
                              length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=EOS,
                              pad_token_id=PAD)[:, prefix.shape[1]:]
    config = GenerationConfig(method="beam" if beams > 1 else "greedy", num_beams=beams, max_length=max_new,
                              min_length=min_new, repetition_penalty=repetition, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    ours = generate(lambda ids, rows: model(ids).logits[:, -1], prefix, EOS, PAD, config)
    assert until_eos(ours) == until_eos(expected)  # transformers pads with EOS when the pad id is 0


def until_eos(ids: Tensor) -> list[list[int]]:
    """Each row's tokens up to and including its first EOS (the rest is padding)."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def test_nucleus_with_tiny_top_p_equals_greedy() -> None:
    tables = random_tables(7, rows=4)
    prefix = [[BOS], [A], [B], [C]]
    greedy = run(Bigram(tables), prefix, method="greedy", min_length=1, max_length=8)
    nucleus = run(Bigram(tables), prefix, method="nucleus", top_p=1e-6, min_length=1, max_length=8)
    assert torch.equal(greedy, nucleus)


def test_nucleus_with_cold_temperature_equals_greedy() -> None:
    prefix = [[BOS], [A], [C]]
    greedy = run(Bigram(MYOPIC), prefix, method="greedy", min_length=0)
    cold = run(Bigram(MYOPIC), prefix, method="nucleus", top_p=1.0, temperature=1e-3, min_length=0)
    assert torch.equal(greedy, cold)


def test_nucleus_is_reproducible_with_a_generator() -> None:
    tables = random_tables(3, rows=1).expand(64, -1, -1)
    prefix = torch.full((64, 1), BOS)
    config = GenerationConfig(method="nucleus", top_p=0.9, min_length=1, max_length=10)

    def sample(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(Bigram(tables), prefix, EOS, PAD, config, generator=gen)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_nucleus_samples_only_inside_the_nucleus() -> None:
    prefix = torch.full((256, 1), BOS)
    gen = torch.Generator().manual_seed(0)
    # BOS -> A 0.5, B 0.4, C 0.1: {A, B} is the smallest set holding >= 0.85.
    config = GenerationConfig(method="nucleus", top_p=0.85, min_length=0, max_length=1)
    first = generate(Bigram(MYOPIC), prefix, EOS, PAD, config, generator=gen)[:, 0]
    assert set(first.tolist()) == {A, B}
    # Only A is needed to reach 0.45.
    config = GenerationConfig(method="nucleus", top_p=0.45, min_length=0, max_length=1)
    first = generate(Bigram(MYOPIC), prefix, EOS, PAD, config, generator=gen)[:, 0]
    assert set(first.tolist()) == {A}


def test_zero_max_length_and_bad_config() -> None:
    out = run(Bigram(MYOPIC), [[BOS], [A]], max_length=0)
    assert out.shape == (2, 0)
    with pytest.raises(ValueError, match="method"):
        GenerationConfig(method="sample")
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
