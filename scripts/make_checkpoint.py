#!/usr/bin/env python3
"""Write an HF-format checkpoint of seeded random weights at a named real shape.

    python scripts/make_checkpoint.py --shape llama-2-7b --out /data/llama-2-7b-random --dtype bf16

The checkpoint has config.json, safetensors shards with model.safetensors.index.json
(one model.safetensors when small), and a small tokenizer.json when the optional
``tokenizers`` package is installed. Shapes: see --help. Any bad input prints one
line on stderr and exits with status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from offload import OffloadError, parse_size  # noqa: E402
from offload.cli import Parser  # noqa: E402
from offload.options import parse_device, parse_dtype  # noqa: E402
from offload.synthetic import new_directory, write_checkpoint  # noqa: E402
from offload.models.shapes import SHAPES, shape_config  # noqa: E402


def main(argv=None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, help=f"one of: {', '.join(SHAPES)}")
    parser.add_argument("--out", required=True, help="directory to write: new or empty (created if missing)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights (default 0)")
    parser.add_argument("--shard-size", default="2GiB", help="largest shard file (default 2GiB)")
    parser.add_argument("--device", default=None, help="where random numbers are made (default: cuda if present)")
    try:
        args = parser.parse_args(argv)
        out = write_checkpoint(shape_config(args.shape), new_directory(args.out, "--out"), parse_dtype(args.dtype), seed=args.seed,
                               shard_bytes=parse_size(args.shard_size, "--shard-size"), device=args.device and parse_device(args.device))
    except OffloadError as e:
        print(f"make_checkpoint: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be made or written, a full disk
        print(f"make_checkpoint: error: cannot write {e.filename or args.out!r} ({e.strerror})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
