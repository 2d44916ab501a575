"""The tokenizer and chat template a GGUF file describes, built with the ``tokenizers`` library.

A GGUF file carries no tokenizer.json: ``tokenizer.ggml.*`` holds the vocabulary, its kind
and the special ids, and ``tokenizer.chat_template`` the Jinja template. Two kinds cover
offload's families:

* ``gpt2``: byte-level BPE (Llama 3, Qwen, SmolLM...). Tokens are stored in the byte-level
  alphabet with their merges; text is split first by the regexes llama.cpp uses for the
  file's ``tokenizer.ggml.pre`` (each applied to the pieces of the one before, as
  llama.cpp's ``unicode_regex_split`` does), and Llama 3-style vocabularies look a whole
  piece up before merging (llama.cpp's ``ignore_merges``).
* ``llama``: SentencePiece BPE (Llama 2, Mistral, Gemma). ``▁`` for spaces, ``<0xNN>``
  byte-fallback tokens, merges from the file or, where it has none, rebuilt from the scores
  (``transformers``' ``generate_merges``; Gemma's from the vocabulary's order, which is its
  merge order); a ``▁`` is prepended to the text unless ``add_space_prefix`` is false.

Tokens typed CONTROL become special added tokens (matched whole, even inside text; by their
plain spelling, as llama.cpp matches them, where it lies outside a byte-level alphabet: DeepSeek's
``<｜User｜>``), USER_DEFINED ones plain added tokens; ``add_bos_token`` puts the bos id first when a caller
asks for special tokens (``encode(text, add_special_tokens=True)``: offload's ``Tokenizer.encode``
of a plain prompt; chat templates write their own).
"""

from __future__ import annotations

import functools
import warnings

from ..chat import ChatTemplate
from ..errors import ConfigError, OffloadWarning
from ..text import Tokenizer
from .reader import GGUFFiles

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType

# Pieces llama.cpp's BPE tokenizer splits text into, per tokenizer.ggml.pre (llama-vocab.cpp), applied in order.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos when the file does not say)
PRE_TOKENIZERS = {
    **{name: ((_LLAMA3,), True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: ((_LLAMA3,), False, False) for name in ("dbrx", "smaug-bpe")},
    **{name: ((_QWEN2,), False, False) for name in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2")},
    **{name: ((r"\p{N}", _GPT2), False, False) for name in ("smollm", "starcoder", "refact", "command-r",
                                                             "codeshell", "exaone", "minerva-7b")},
    **{name: ((_GPT2,), False, False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    "tekken": ((_TEKKEN,), True, True),
    **{name: ((_GPT4O,), False, False) for name in ("gpt-4o", "llama4")},
    "default": (_DEFAULT, False, False),
}


def gguf_tokenizer(files: GGUFFiles) -> Tokenizer | None:
    """The file's tokenizer with its chat template; None when the file has no vocabulary or the
    ``tokenizers`` package is missing. A vocabulary of a kind offload cannot build raises ConfigError."""
    tokens = files.value("tokenizer.ggml.tokens")
    if not tokens:
        return None
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    kind = files.value("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"{files.path.name}: tokenizer.ggml.model {kind!r} is not supported "
                          "(supported: gpt2, llama); send token ids instead")
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise ConfigError(f"{files.path.name}: tokenizer.ggml.tokens must be an array of strings")
    try:
        inner = _byte_level_bpe(files, tokens) if kind == "gpt2" else _sentencepiece_bpe(files, tokens)
        _add_bos_eos(inner, files, tokens, kind)
    except ConfigError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exception for a vocabulary it cannot build
        raise ConfigError(f"{files.path.name}: its tokenizer (tokenizer.ggml.*) cannot be built ({type(e).__name__}: "
                          f"{str(e)[:200]}); send token ids instead") from None
    return Tokenizer(inner, chat_template(files, tokens))


def chat_template(files: GGUFFiles, tokens: list[str] | None = None) -> ChatTemplate | None:
    """``tokenizer.chat_template`` (or of several named ones, ``default``), with the special tokens'
    strings (``bos_token``...) it may use."""
    source = files.value("tokenizer.chat_template")
    if source is None:
        names = files.value("tokenizer.chat_templates") or []
        named = {n: files.value(f"tokenizer.chat_template.{n}") for n in names}
        source = named.get("default")
    if source is None:
        return None
    tokens = tokens if tokens is not None else files.value("tokenizer.ggml.tokens") or []
    special = {}
    for key, field in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = files.value(f"tokenizer.ggml.{field}_token_id")
        if i is not None and 0 <= i < len(tokens):
            special[key] = tokens[i]
    return ChatTemplate(source, special, name=f"chat template of {files.path.name}")


# ----------------------------------------------------------------------------- byte-level BPE


def _byte_level_bpe(files: GGUFFiles, tokens: list[str]):
    from tokenizers import Regex, Tokenizer as Inner, decoders, models, pre_tokenizers

    pre = files.value("tokenizer.ggml.pre")
    if pre is None:
        warnings.warn(f"{files.path.name}: no tokenizer.ggml.pre; splitting text as llama.cpp's 'default' does "
                      "(as llama.cpp warns, text may be split differently from training)", OffloadWarning,
                      stacklevel=3)
        pre = "default"
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{files.path.name}: tokenizer.ggml.pre {pre!r} is not one offload knows "
                          f"({', '.join(sorted(PRE_TOKENIZERS))}); send token ids instead")
    regexes, ignore_merges, _ = PRE_TOKENIZERS[pre]
    alphabet = set(byte_chars())
    # llama.cpp's converter keeps a control or user-defined token in plain text (DeepSeek's <｜User｜>): it is
    # matched whole in text by that spelling, which stays its vocabulary entry; any other token is respelled
    typed = {i for i, k in enumerate(files.value("tokenizer.ggml.token_type") or []) if k in (CONTROL, USER_DEFINED)}
    spelled = [t if i in typed or set(t) <= alphabet else _byte_spelling(t) for i, t in enumerate(tokens)]
    vocab = _vocab(spelled, files)
    merges = [tuple(m.split(" ", 1)) for m in files.value("tokenizer.ggml.merges") or []]
    inner = Inner(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    inner.decoder = decoders.ByteLevel()
    _add_typed_tokens(inner, files, tokens)
    return inner


@functools.cache
def byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> character table (``bytes_to_unicode``): the alphabet byte-level vocabularies are spelled in.
    Printable bytes stand for themselves, the others for characters from 256 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        table.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return tuple(table)


def _byte_spelling(token: str) -> str:
    """A token the file spells in plain text, in the byte alphabet (as transformers respells it)."""
    chars = byte_chars()
    return "".join(chars[b] for b in token.encode("utf-8"))


# ----------------------------------------------------------------------------- SentencePiece BPE


def _sentencepiece_bpe(files: GGUFFiles, tokens: list[str]):
    from tokenizers import Tokenizer as Inner, decoders, models, normalizers, pre_tokenizers

    gemma = files.value("general.architecture", "").startswith("gemma")
    if gemma:  # Gemma stores tokens of several spaces as spaces; its merges use ▁
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = _vocab(tokens, files)
    merges = [tuple(m.split(" ", 1)) for m in files.value("tokenizer.ggml.merges") or []]
    if not merges:
        scores = files.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        order = {t: -i for i, t in enumerate(tokens)} if gemma else dict(zip(tokens, scores))
        merges = _merges_from_scores(vocab, order)
    unk = files.value("tokenizer.ggml.unknown_token_id")
    inner = Inner(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                             fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        inner.normalizer = normalizers.Replace(" ", "▁")
    else:
        prefix = files.value("tokenizer.ggml.add_space_prefix", True)
        inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                       split=False)
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    inner.decoder = decoders.Sequence(steps)
    _add_typed_tokens(inner, files, tokens)
    return inner


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best merged token first (transformers' ``generate_merges``)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


# ----------------------------------------------------------------------------- shared


def _vocab(tokens: list[str], files: GGUFFiles) -> dict[str, int]:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        warnings.warn(f"{files.path.name}: {len(tokens) - len(vocab)} tokens repeat an earlier token's text; "
                      "their ids are never produced by encoding", OffloadWarning, stacklevel=4)
    return vocab


def _add_typed_tokens(inner, files: GGUFFiles, tokens: list[str]) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens: matched whole in text."""
    from tokenizers import AddedToken

    types = files.value("tokenizer.ggml.token_type") or []
    vocab = inner.get_vocab(with_added_tokens=False)
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == CONTROL and t in vocab]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab]
    if control:
        inner.add_special_tokens(control)
    if user:
        inner.add_tokens(user)


def _add_bos_eos(inner, files: GGUFFiles, tokens: list[str], kind: str) -> None:
    """A post-processor that adds bos (and eos) as the file says, for callers that ask for special tokens."""
    from tokenizers import processors

    pre = files.value("tokenizer.ggml.pre")
    default_bos = kind == "llama" or (pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre][2])
    add_bos = files.value("tokenizer.ggml.add_bos_token", default_bos)
    add_eos = files.value("tokenizer.ggml.add_eos_token", False)
    bos, eos = files.value("tokenizer.ggml.bos_token_id"), files.value("tokenizer.ggml.eos_token_id")
    first = [(tokens[bos], bos)] if add_bos and bos is not None else []
    last = [(tokens[eos], eos)] if add_eos and eos is not None else []
    if not first and not last:
        return
    single = " ".join([t for t, _ in first] + ["$A"] + [t for t, _ in last])
    pair = " ".join([t for t, _ in first] + ["$A"] + [t for t, _ in last] + ["$B:1"] + [f"{t}:1" for t, _ in last])
    inner.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=first + last)
