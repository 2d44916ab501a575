#!/usr/bin/env python3
"""Write an HF-format checkpoint of seeded random weights at a named real shape.

    python scripts/make_checkpoint.py --shape llama-2-7b --out /data/llama-2-7b-random --dtype bf16

The checkpoint has config.json, safetensors shards with model.safetensors.index.json
(one model.safetensors when small), and a small tokenizer.json when the optional
``tokenizers`` package is installed. Shapes: see --help.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload import OffloadError, parse_size  # noqa: E402
from offload.options import parse_dtype  # noqa: E402
from offload.synthetic import write_checkpoint  # noqa: E402
from offload.models.shapes import SHAPES, shape_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, help=f"one of: {', '.join(SHAPES)}")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default="2GiB", help="largest shard file (default 2GiB)")
    parser.add_argument("--device", default=None, help="where random numbers are made (default: cuda if present)")
    args = parser.parse_args(argv)
    try:
        out = write_checkpoint(shape_config(args.shape), args.out, parse_dtype(args.dtype), seed=args.seed,
                               shard_bytes=parse_size(args.shard_size, "--shard-size"), device=args.device)
    except OffloadError as e:
        print(f"make_checkpoint: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
