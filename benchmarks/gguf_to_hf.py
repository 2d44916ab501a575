#!/usr/bin/env python3
"""A GGUF file as a float Hugging Face checkpoint, read by transformers (with the ``gguf`` package).

    python benchmarks/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2 [--dtype float32]

The weights are dequantized (a Q4_1 file's values exactly, in float32), with the file's tokenizer and
chat template. The tests use it as the reference reading of a real model; benchmarks use it for a dense
target (an int4 draft of a model stored in 4 bits would be the model itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def gguf_to_hf(gguf_file, out, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``gguf_file``'s model to the directory ``out`` (config.json, model.safetensors, tokenizer)."""
    import transformers
    from safetensors.torch import save_file

    gguf_file, out = Path(gguf_file), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    # transformers will not save_pretrained a model it read from GGUF: write its weights and config by hand
    tied = hf.config.tie_word_embeddings
    save_file({name: t.contiguous() for name, t in hf.state_dict().items() if not (tied and name == "lm_head.weight")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the weights written are dequantized: plain floats
    (out / "config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf_file")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    print(f"wrote {gguf_to_hf(args.gguf_file, args.out, getattr(torch, args.dtype))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
