"""CapFilt quality on shapes: how many wrong web captions a BLIP filter removes and
how many right ones it keeps.

500 shapes test images, each with one web caption; for 20% of them the caption is
replaced by a caption of another image (seeded). Runs ``vlzoo capfilt`` with the
given checkpoint as captioner and filter at each threshold and prints both rates.

    python benchmarks/capfilt_shapes.py runs/blip-shapes-tiny/checkpoints/last.ckpt --thresholds 0.5 0.3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vlzoo.cli import main as vlzoo
from vlzoo.data.capfilt import noisy_shapes_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a BLIP checkpoint (captioner and filter)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, wrong = noisy_shapes_source(Path(tmp) / "noisy", args.images, args.noise)
        web = [json.loads(line)["captions"][0] for line in source.read_text().splitlines()]
        right = [i for i in range(len(web)) if i not in wrong]
        for threshold in args.thresholds:
            out = Path(tmp) / f"clean-{threshold}"
            vlzoo(["capfilt", "--captioner", args.checkpoint, "--filter", args.checkpoint, "--data", str(source),
                   "--out", str(out), "--threshold", str(threshold)])
            cleaned = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
            kept = [web[i] in row["captions"] for i, row in enumerate(cleaned)]
            removed_wrong = sum(not kept[i] for i in wrong) / len(wrong)
            kept_right = sum(kept[i] for i in right) / len(right)
            print(f"threshold {threshold}: removed {removed_wrong:.1%} of wrong web captions, "
                  f"kept {kept_right:.1%} of right ones")


if __name__ == "__main__":
    main()
