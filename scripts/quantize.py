#!/usr/bin/env python3
"""Quantize a checkpoint once and save it: offload then loads it compressed, without quantizing again.

    python scripts/quantize.py --model path/to/Llama-2-70b-hf --quantize int4 --out path/to/llama-2-70b-int4

Reads one tensor at a time (with a progress bar), quantizes the decoder layers' linear
weights (int8: one scale per output channel; int4: groups of --group-size columns,
each group's scale and minimum searched to minimise its error unless --rounding minmax)
and writes safetensors shards with a config.json that records the format, and the
tokenizer's files. ``load_model(out)`` reads the parts as they are: the same logits as
``load_model(model, quantize=...)`` in the dtype saved (``--dtype``). Any bad input prints one
line on stderr and exits 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload import OffloadError, parse_size  # noqa: E402
from offload.cli import Parser  # noqa: E402
from offload.errors import InputError  # noqa: E402
from offload.models.quant import check_request  # noqa: E402
from offload.options import parse_device, parse_dtype  # noqa: E402
from offload.quantized import write_quantized  # noqa: E402


def shard_size(text: str) -> int:
    """--shard-size in bytes, refused unless positive: 0 would write a shard for every tensor."""
    size = parse_size(text, "--shard-size")
    if size < 1:
        raise InputError(f"--shard-size must be positive, got {text!r}")
    return size


def main(argv=None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--quantize", required=True, choices=["int8", "int4"],
                        help="int8: one scale a row; int4: a scale and minimum a group of columns")
    parser.add_argument("--out", required=True, help="directory to write: new or empty (created if missing)")
    parser.add_argument("--group-size", type=int, default=None, help="int4: columns per scale (default 128, or the largest smaller power of two that divides each input dimension)")
    parser.add_argument("--rounding", choices=["search", "minmax"],
                        help="int4: each group's scale and minimum searched (default) or its range")
    parser.add_argument("--dtype", default="bf16", help="of the scales and the unquantized tensors (default bf16)")
    parser.add_argument("--device", default="cpu", help="where tensors are quantized (default cpu; cuda is much faster)")
    parser.add_argument("--shard-size", default="2GiB", help="largest shard file (default 2GiB)")
    try:
        args = parser.parse_args(argv)
        if args.rounding is not None and args.quantize != "int4":
            parser.error(f"--rounding is for int4 ({args.quantize} has one scale per output channel)")
        args.rounding = args.rounding or "search"
        check_request(args.quantize, args.group_size, args.rounding)
        write_quantized(args.model, args.out, args.quantize, args.group_size, args.rounding,
                        parse_dtype(args.dtype), parse_device(args.device), shard_size(args.shard_size))
    except OffloadError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written: permissions, a full disk, a read-only place
        print(f"quantize: error: cannot write {args.out} ({e.strerror or e})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantize: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
