"""BLIP-2 Q-Former forward + backward, vlzoo vs transformers, identical sizes and weights.

transformers' ``Blip2ForImageTextRetrieval`` is built at a size (its vision tower at one
layer: it is not run) and converted to vlzoo's BLIP-2 with the BLIP-2 converter; the
frozen image tokens are random, the same for both. Two passes, each followed by
backward of the mean squared output and gradients cleared:

- ``queries``: the learned queries cross-attending to the image tokens (ITC's image
  side, stage 2's soft prompt): transformers' ``Blip2QFormerModel`` called as its
  retrieval model's ``forward`` calls it;
- ``itm``: queries and text in one pass under the bidirectional mask (ITM), the
  transformers side again as its ``forward`` (``embeddings`` then ``qformer``).

    python benchmarks/bench_qformer.py --json /tmp/qformer.json [--quick]
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from common import (
    captions,
    compare,
    device,
    parameter_mib,
    run_benchmarks,
    train_without_dropout,
)

from vlzoo.data.tokenizers import ShapesTokenizer
from vlzoo.hub.convert.hf_blip2 import (
    RETRIEVAL,
    blip2_config_from_hf,
    build_blip2_retrieval,
    convert_hf_blip2_state,
)
from vlzoo.weights import load_strict

SIZES = {  # Q-Former config, queries, image tokens (N, width)
    "tiny": (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512), 8, (65, 96)),
    "blip2": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), 32,
              (257, 1408)),
}
# (pass, size, batch, timed repeats)
RUNS = [("queries", "tiny", 32, 25), ("queries", "blip2", 4, 4), ("itm", "tiny", 32, 25), ("itm", "blip2", 4, 4)]
QUICK_RUNS = [("queries", "tiny", 16, 5), ("itm", "tiny", 16, 5)]


def build_pair(size: str):
    """(transformers Blip2ForImageTextRetrieval, vlzoo BLIP2 with its weights)."""
    qformer, queries, (_, width) = SIZES[size]
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1, num_attention_heads=8,
                  image_size=32, patch_size=16)
    qformer = {**qformer, "cross_attention_frequency": 2, "encoder_hidden_size": width, "use_qformer_text_input": True,
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=queries)
    torch.manual_seed(0)
    hf = transformers.Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        hf.query_tokens.normal_(std=0.02)  # transformers starts them at zero
    config_dict = {**config.to_dict(), "architectures": [RETRIEVAL]}
    state, absent, _ = convert_hf_blip2_state(hf.state_dict(), config_dict, RETRIEVAL)
    ours = build_blip2_retrieval(blip2_config_from_hf(config_dict))
    load_strict(ours, state, source="transformers Blip2ForImageTextRetrieval", allow_missing=absent)
    return hf, ours


def backward(output: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Backward of a fixed random projection of the output (not of its mean square: a
    LayerNorm output has a constant norm, whose near-zero gradient is all denormals)."""
    probe = torch.randn(output.shape[-1], generator=torch.Generator().manual_seed(2)).to(output.device)
    loss = (output.float() @ probe).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def sides(kind: str, hf, ours, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The two sides of pass ``kind``: each returns its loss."""
    q = ours.qformer.num_queries

    def vlzoo() -> torch.Tensor:
        if kind == "queries":
            return backward(ours.qformer(image).queries, ours)
        return backward(ours.qformer(image, ids, mask, "bidirectional").queries, ours)

    def peer() -> torch.Tensor:
        queries = hf.query_tokens.expand(image.shape[0], -1, -1)
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        if kind == "queries":
            out = hf.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask)
            return backward(out.last_hidden_state, hf)
        joint_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        embeds = hf.embeddings(input_ids=ids, query_embeds=queries)
        out = hf.qformer(query_embeds=embeds, query_length=q, attention_mask=joint_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask)
        return backward(out.last_hidden_state[:, :q], hf)

    return {"vlzoo": vlzoo, "transformers": peer}


def run(kind: str, size: str, batch: int, repeats: int) -> dict[str, Any]:
    dev = device()
    hf, ours = build_pair(size)
    hf, ours = hf.to(dev), ours.to(dev)
    train_without_dropout(hf, ours)
    tokens, (length, width) = ShapesTokenizer(32)(captions(batch)), SIZES[size][2]
    image = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1)).to(dev)
    ids, mask = tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev)
    result = compare(sides(kind, hf, ours, image, ids, mask), batch, repeats, dev)
    result.update(pass_=kind, size=size, batch=batch, queries=ours.qformer.num_queries, image_tokens=[length, width],
                  text_tokens=ids.shape[1] if kind == "itm" else 0, parameter_mib=parameter_mib(ours.qformer),
                  first_loss_abs_diff=abs(result["vlzoo"]["output"] - result["transformers"]["output"]))
    return result


def main() -> None:
    run_benchmarks(__doc__.split("\n\n")[0], "qformer", "transformers", RUNS, QUICK_RUNS, run)


if __name__ == "__main__":
    main()
