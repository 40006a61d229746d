import open_clip
import torch

from vlzoo.data.shapes import build_split
from vlzoo.data.tokenizers import OpenCLIPTokenizer, ShapesTokenizer


def test_shapes_tokenizer_round_trips_every_caption_without_unknowns():
    tok = ShapesTokenizer(context_length=40)
    unk = tok._tok.token_to_id("[UNK]")
    for record in build_split("test", 50).records:
        texts = record["captions"] + [n["caption"] for n in record["negatives"]]
        batch = tok(texts)
        assert not (batch["input_ids"] == unk).any()
        for text, ids, mask in zip(texts, batch["input_ids"], batch["attention_mask"]):
            ids = ids[mask.bool()]
            assert ids[0] == tok.info.bos_id and ids[-1] == tok.info.eos_id
            assert tok.decode(ids).replace(" ,", ",").replace(" :", ":") == text


def test_truncation_keeps_end_of_text_and_pads_right():
    tok = ShapesTokenizer(context_length=6)
    batch = tok(["a large red circle to the left of a small blue square", "a red circle"])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, -1] == tok.info.eos_id
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["input_ids"][1, -1] == tok.info.pad_id


def test_open_clip_tokenizer_matches_open_clip():
    tok = OpenCLIPTokenizer(context_length=77)
    texts = ["a photo of a dog", "A Large RED circle, left of a square!"]
    ours = tok(texts)["input_ids"]
    ref = open_clip.tokenize(texts)
    padded = torch.zeros_like(ref)
    padded[:, : ours.shape[1]] = ours
    assert torch.equal(padded, ref)
