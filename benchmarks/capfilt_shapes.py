"""CapFilt quality on shapes: how many wrong web captions a BLIP filter removes and
how many right ones it keeps.

500 shapes test images, each with one web caption; for 20% of them the caption is
replaced by a caption of another image (seeded). Runs ``vlzoo capfilt`` with the
given checkpoint as captioner and filter at each threshold and prints both rates.

    python benchmarks/capfilt_shapes.py runs/blip-shapes-tiny/checkpoints/last.ckpt --thresholds 0.5 0.3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vlzoo.capfilt import noisy_shapes_source, web_caption_rates
from vlzoo.cli import main as vlzoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a BLIP checkpoint (captioner and filter)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, wrong = noisy_shapes_source(Path(tmp) / "noisy", args.images, args.noise)
        for threshold in args.thresholds:
            out = Path(tmp) / f"clean-{threshold}"
            vlzoo(["capfilt", "--captioner", args.checkpoint, "--filter", args.checkpoint, "--data", str(source),
                   "--out", str(out), "--threshold", str(threshold)])
            removed_wrong, kept_right = web_caption_rates(source, wrong, out)
            print(f"threshold {threshold}: removed {removed_wrong:.1%} of wrong web captions, "
                  f"kept {kept_right:.1%} of right ones")


if __name__ == "__main__":
    main()
