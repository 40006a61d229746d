"""Each family's evaluation protocol as its paper's released code runs it: the ITM rerank
(how many candidates, which score, whether the ITC similarity is added), the decoding
settings of captions and answers, and how VQA answers are chosen. ``vlzoo eval`` applies
the protocol of the loaded model's family (the registry's ``protocol``) and prints it.

Lengths: ``Decoding.lengths`` says what the paper's ``max_length`` / ``min_length`` count.
``"total"`` (BLIP's code, transformers' ``generate`` for a decoder fed its prompt) counts the
prompt's tokens ([DEC] and "a picture of"); ``"new"`` counts generated tokens only (what
vlzoo's :class:`~vlzoo.models.generation.GenerationConfig` means).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlzoo.models.generation import GenerationConfig

ITM_SCORES = ("match_logit", "margin")
LENGTH_RULES = ("total", "new")
TEXT_RULES = ("blip_caption", "albef_caption", "blip_question")
_BLIP_MARKS = re.compile(r"""([.!"()*#:;~])""")
_ALBEF_MARKS = re.compile(r"""([,.'!?"()*#:;~])""")
_SPACES = re.compile(r"\s{2,}")


@dataclass(frozen=True)
class TextRule:
    """How a paper's code cleans captions or questions before its tokenizer.

    - ``blip_caption`` (BLIP's and LAVIS's ``pre_caption``): lower-case, ``.!"()*#:;~`` become
      spaces, runs of spaces collapse, stripped, at most ``max_words`` words;
    - ``albef_caption`` (ALBEF's ``pre_caption``): lower-case, ``,.'!?"()*#:;~`` removed,
      ``-`` and ``/`` become spaces, then as above;
    - ``blip_question`` (BLIP's ``pre_question``): lower-case, ``.!"()*#:;~`` removed, trailing
      spaces stripped, at most ``max_words`` words.
    """

    kind: str
    max_words: int

    def __post_init__(self) -> None:
        if self.kind not in TEXT_RULES:
            raise ValueError(f"TextRule.kind must be one of {TEXT_RULES}, got {self.kind!r}")

    def __call__(self, text: str) -> str:
        text = text.lower()
        if self.kind == "blip_question":
            text = _BLIP_MARKS.sub("", text).rstrip(" ")
        else:
            if self.kind == "albef_caption":
                text = _ALBEF_MARKS.sub("", text).replace("-", " ").replace("/", " ")
            else:
                text = _BLIP_MARKS.sub(" ", text)
            text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
        words = text.split(" ")
        return " ".join(words[: self.max_words]) if len(words) > self.max_words else text


@dataclass(frozen=True)
class Decoding:
    """A paper's decoding settings for one kind of output."""

    num_beams: int
    max_length: int
    min_length: int
    lengths: str = "new"
    prompt: str | None = None
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.lengths not in LENGTH_RULES:
            raise ValueError(f"Decoding.lengths must be one of {LENGTH_RULES}, got {self.lengths!r}")

    def generation_config(self, prefix_length: int = 1) -> GenerationConfig:
        """vlzoo's settings (new tokens only) for a decoder started from ``prefix_length``
        tokens (the start token, [DEC] or BOS, and any prompt)."""
        shift = prefix_length if self.lengths == "total" else 0
        return GenerationConfig(
            method="beam" if self.num_beams > 1 else "greedy", num_beams=self.num_beams,
            max_length=max(self.max_length - shift, 1), min_length=max(self.min_length - shift, 0),
            repetition_penalty=self.repetition_penalty, length_penalty=self.length_penalty,
        )

    def describe(self) -> str:
        prompt = f", prompt {self.prompt!r}" if self.prompt is not None else ""
        return (f"beam {self.num_beams}, max {self.max_length}, min {self.min_length} "
                f"({'prompt included' if self.lengths == 'total' else 'new tokens'}), "
                f"repetition penalty {self.repetition_penalty}, length penalty {self.length_penalty}{prompt}")


@dataclass(frozen=True)
class EvalProtocol:
    """How a family's paper evaluates it.

    - ``rerank_k``: ITM reranks this many ITC candidates per query, per benchmark
      (``"default"`` for the others); 0: no ITM stage.
    - ``itm_score``: ``match_logit`` (the ITM head's "match" logit, as ALBEF, BLIP and
      BLIP-2's code rank by) or ``margin`` (match minus no-match).
    - ``rerank_itc``: ``cosine`` (the ITC cosine added to the ITM score: BLIP, BLIP-2) or
      ``none`` (ITM alone: ALBEF).
    - ``caption`` / ``vqa``: decoding settings; ``vqa_inference``: ``generate`` or ``rank``
      (score every answer of an answer list, BLIP's VQA) and ``rank_candidates``.
    - ``caption_text`` / ``question_text``: how the paper's code cleans retrieval captions and
      VQA questions (applied to the published checkpoints, which were trained on such text).
    """

    source: str
    rerank_k: dict[str, int] = field(default_factory=lambda: {"default": 0})
    itm_score: str = "match_logit"
    rerank_itc: str = "cosine"
    caption: Decoding | None = None
    vqa: Decoding | None = None
    vqa_inference: str = "generate"
    rank_candidates: int = 128
    caption_text: TextRule | None = None
    question_text: TextRule | None = None

    def __post_init__(self) -> None:
        if self.itm_score not in ITM_SCORES:
            raise ValueError(f"EvalProtocol.itm_score must be one of {ITM_SCORES}, got {self.itm_score!r}")

    def k_for(self, benchmark: str) -> int:
        return self.rerank_k.get(benchmark, self.rerank_k.get("default", 0))


# retrieval: k_test 256 on COCO and 128 on Flickr30k in ALBEF's and BLIP's configs; 128 in LAVIS's BLIP-2
_MOMENTUM_K = {"coco-retrieval": 256, "flickr30k-retrieval": 128, "default": 128}

CLIP = EvalProtocol("CLIP (Radford et al., 2021): cosine similarity; zero-shot with OpenAI's 80 ImageNet templates")
ALBEF = EvalProtocol("ALBEF's Retrieval.py: ITM match logit of the top k ITC candidates; captions cleaned by its "
                     "pre_caption (30 words)", _MOMENTUM_K, rerank_itc="none",
                     caption_text=TextRule("albef_caption", 30))
BLIP = EvalProtocol(
    "BLIP's train_retrieval.py / train_caption.py (caption_coco.yaml): ITM match logit + ITC cosine; captions "
    "beam 3, max 20, min 5 after 'a picture of '; captions cleaned by its pre_caption (30 words)", _MOMENTUM_K,
    caption=Decoding(num_beams=3, max_length=20, min_length=5, lengths="total", prompt="a picture of "),
    caption_text=TextRule("blip_caption", 30),
)
BLIP_VQA = EvalProtocol(
    "BLIP's train_vqa.py (vqa.yaml): answers ranked over the answer list (128 candidates by first-token "
    "probability); generation: beam 3, max 10, min 1 ([DEC] counted); questions cleaned by its pre_question",
    vqa=Decoding(num_beams=3, max_length=10, min_length=1, lengths="total"), vqa_inference="rank",
    rank_candidates=128, question_text=TextRule("blip_question", 50),
)
BLIP2 = EvalProtocol(
    "LAVIS blip2 (ret_coco_eval.yaml, Blip2Qformer.generate): ITM match logit averaged over queries + ITC; "
    "Q-Former captions beam 3, max 30, min 10 (BOS counted); captions cleaned by BlipCaptionProcessor (50 words)",
    {"default": 128}, caption=Decoding(num_beams=3, max_length=30, min_length=10, lengths="total"),
    caption_text=TextRule("blip_caption", 50),
)
BLIP2_LLM = EvalProtocol(
    "LAVIS blip2_opt / blip2_t5 (caption_coco_*_eval.yaml, vqav2_zeroshot_*_eval.yaml): captions beam 5, max 30, "
    "min 8 after 'a photo of'; VQA beam 5, max 10, min 1, length penalty -1 after 'Question: {} Short answer:'",
    caption=Decoding(num_beams=5, max_length=30, min_length=8, prompt="a photo of"),
    vqa=Decoding(num_beams=5, max_length=10, min_length=1, length_penalty=-1.0,
                 prompt="Question: {} Short answer:"),
)
