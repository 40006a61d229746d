"""Tokenizers behind one call: ``tokenizer(texts) -> {"input_ids", "attention_mask"}``.

Three kinds, chosen by name in a text-encoder config:

- ``shapes``: a word-level tokenizer trained (in well under a second) with the
  ``tokenizers`` library on every text the embedded shapes dataset can produce;
- ``open_clip``: open_clip's bundled BPE tokenizer (SOT ... EOT, context 77);
- anything else: a Hugging Face tokenizer name or local directory (``AutoTokenizer``).

Every tokenizer pads on the right, so the last attended position of a row is its
end-of-text token (CLIP's EOT pooling); to the batch's longest row, or (``pad_to_context``,
as open_clip's tokenizer for checkpoints loaded from open_clip) to the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

SHAPES_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")


@dataclass
class TokenizerInfo:
    """Ids a model needs to know about; ``None`` where the tokenizer has no such token."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None = None
    enc_id: int | None = None  # BLIP's [ENC] (image-grounded encoder)
    dec_id: int | None = None  # BLIP's [DEC] (image-grounded decoder)

    @property
    def special_ids(self) -> list[int]:
        """Every special id this tokenizer has (never masked for MLM)."""
        ids = (self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.enc_id, self.dec_id)
        return sorted({i for i in ids if i is not None})


class Tokenizer:
    """Base class: subclasses implement :meth:`encode_batch` and :meth:`decode`."""

    info: TokenizerInfo
    context_length: int
    pad_to_context: bool = False  # pad every batch to context_length (open_clip's output), not its longest row

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` into ``input_ids`` and ``attention_mask``, each (B, L) long."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [ids[: self.context_length] for ids in self.encode_batch(list(texts))]
        for row in rows:  # keep the end-of-text token when truncating
            if self.info.eos_id is not None and len(row) == self.context_length:
                row[-1] = self.info.eos_id
        length = self.context_length if self.pad_to_context else max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), length), self.info.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size


class ShapesTokenizer(Tokenizer):
    """Word-level tokenizer over the shapes vocabulary: ``[CLS] words... [SEP]``."""

    def __init__(self, context_length: int = 40):
        self.context_length = context_length
        self._tok = _train_shapes_tokenizer()
        ids = {t: self._tok.token_to_id(t) for t in SHAPES_SPECIAL_TOKENS}
        self.info = TokenizerInfo(
            vocab_size=self._tok.get_vocab_size(),
            pad_id=ids["[PAD]"],
            bos_id=ids["[CLS]"],
            eos_id=ids["[SEP]"],
            mask_id=ids["[MASK]"],
            enc_id=ids["[ENC]"],
            dec_id=ids["[DEC]"],
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True)

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


# The shapes vocabulary in id order, frozen: ids are what every saved shapes model's
# embeddings are indexed by, so a word the generator starts using is appended at the end,
# never inserted (tests/data/test_shapes.py checks that every generated word is here).
SHAPES_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", "a", "is", "small", "the", "?", "large",
    "what", "yellow", "triangle", "cross", "diamond", "purple", "circle", "red", "orange", "there", "blue",
    "green", "star", "square", "to", "of", "left", "above", "size", "shapes", ",", "object", "shape",
    "colour", "right", "relative", "where", "which", "and", "are", "how", "many", "no", "yes", "on", "two",
    ":", "one", "below", "from", "top", "three", "bottom", "picture", "background", "dark", "that", "under",
    "between", "in", "row", "at", "column", "answer", "photo", "question", "{", "}",
)


@lru_cache(maxsize=1)
def _train_shapes_tokenizer():
    """A word-level tokenizer over :data:`SHAPES_VOCAB` (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    tok = HFTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SHAPES_VOCAB)}, unk_token="[UNK]"))
    tok.add_special_tokens(list(SHAPES_SPECIAL_TOKENS))  # already in the vocabulary: ids unchanged
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


class OpenCLIPTokenizer(Tokenizer):
    """open_clip's bundled BPE tokenizer (lower-cased, ``<start_of_text> ... <end_of_text>``)."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.info = TokenizerInfo(
            vocab_size=len(self._tok.encoder),
            pad_id=0,
            bos_id=self._tok.sot_token_id,
            eos_id=self._tok.eot_token_id,
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self.info.bos_id] + self._tok.encode(t) + [self.info.eos_id] for t in texts]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.info.pad_id, self.info.bos_id, self.info.eos_id}
        return self._tok.decode([i for i in ids if i not in special]).strip()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer by hub name or local directory.

    ``blip_tokens`` adds BLIP's ``[DEC]`` and ``[ENC]`` special tokens when missing
    (the text model's embeddings then grow to ``vocab_size``).
    """

    def __init__(self, name_or_path: str, context_length: int = 64, blip_tokens: bool = False):
        from transformers import AutoTokenizer

        self.context_length = context_length
        self.name_or_path = name_or_path
        self.blip_tokens = blip_tokens
        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        if blip_tokens:
            missing = [t for t in ("[DEC]", "[ENC]") if t not in self._tok.get_vocab()]
            if missing:
                self._tok.add_special_tokens({"additional_special_tokens": missing})
        ids = self._tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) if blip_tokens else [None, None]
        bos = self._tok.cls_token_id if self._tok.cls_token_id is not None else self._tok.bos_token_id
        eos = self._tok.sep_token_id if self._tok.sep_token_id is not None else self._tok.eos_token_id
        self.info = TokenizerInfo(
            vocab_size=len(self._tok),
            pad_id=self._tok.pad_token_id if self._tok.pad_token_id is not None else 0,
            bos_id=bos,
            eos_id=eos,
            mask_id=self._tok.mask_token_id,
            dec_id=ids[0],
            enc_id=ids[1],
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def build_tokenizer(name: str, context_length: int, blip_tokens: bool = False) -> Tokenizer:
    """``shapes``, ``open_clip`` or a Hugging Face name/directory (``blip_tokens``: make
    sure [DEC] and [ENC] exist; the shapes vocabulary always has them)."""
    if name == "shapes":
        return ShapesTokenizer(context_length)
    if name == "open_clip":
        if blip_tokens:
            raise ValueError("text.tokenizer: open_clip's tokenizer has no [DEC]/[ENC]; use a BERT tokenizer")
        return OpenCLIPTokenizer(context_length)
    return HFTokenizer(name, context_length, blip_tokens)
