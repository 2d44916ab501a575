#!/usr/bin/env python3
"""A GGUF file as a float Hugging Face checkpoint, read by transformers (with the ``gguf`` package).

    python benchmarks/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2 [--dtype float32]

The weights are dequantized (a Q4_1 file's values exactly, in float32), with the file's tokenizer and
chat template. The tests use it as the reference reading of a real model; benchmarks use it for a dense
target (an int4 draft of a model stored in 4 bits would be the model itself).

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from offload.cli import Parser, report_bad_input  # noqa: E402
from offload.errors import InputError  # noqa: E402


def gguf_to_hf(gguf_file, out, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``gguf_file``'s model to the directory ``out`` (config.json, model.safetensors, tokenizer)."""
    import transformers
    from safetensors.torch import save_file

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise InputError(f"{gguf_file}: no such file")
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                               dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (OSError, ValueError) as e:  # what transformers raises for a file it cannot read
        raise InputError(f"{gguf_file}: transformers cannot read it ({e})") from None
    out.mkdir(parents=True, exist_ok=True)
    # transformers will not save_pretrained a model it read from GGUF: write its weights and config by hand
    tied = hf.config.tie_word_embeddings
    save_file({name: t.contiguous() for name, t in hf.state_dict().items() if not (tied and name == "lm_head.weight")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the weights written are dequantized: plain floats
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = Parser(prog="gguf_to_hf", description=__doc__.split("\n")[0])
    p.add_argument("gguf_file")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    try:
        args = p.parse_args(argv)
        print(f"wrote {gguf_to_hf(args.gguf_file, args.out, getattr(torch, args.dtype))}")
    except InputError as e:
        print(f"gguf_to_hf: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("gguf_to_hf", main))
