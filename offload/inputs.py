"""Token ids in and out: the checks every entry point shares (of ids, and of text), and Hugging Face-style
adapters.

``model(input_ids)`` and ``model.generate(input_ids)`` take what ``transformers``
users pass (a ``[batch, seq]`` tensor with an optional attention mask, or lists of
ids of any length) and give back what ``transformers`` returns.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError


def is_real(value) -> bool:
    """A finite number, not a bool (an integer too large for a float is not one)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_keywords(given, names, what: str, see: str = "") -> None:
    """Refuse keywords ``given`` that are not among ``names`` (a Hugging Face habit, ``max_length=``, say), with
    the closest name where there is one: InputError, not Python's TypeError."""
    import difflib

    unknown = sorted(set(given) - set(names))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown {what} {unknown[0]!r}{hint}" + (f"; {see}" if see else ""))


def ascii_int(text: str) -> int:
    """``int(text)`` of a number written in ASCII: ``int`` also reads other scripts' digits (``"４"`` is 4, ``"١٢"``
    is 12), which a flag, a size or a switch refuses as it refuses any other text that is no number. A ValueError
    otherwise, as ``int``'s, so that each caller words its own message."""
    return int(_ascii(text))


def ascii_float(text: str) -> float:
    """``float(text)`` of a number written in ASCII (``float("１.5")`` is 1.5), as :func:`ascii_int`."""
    return float(_ascii(text))


def _ascii(text: str) -> str:
    if not text.isascii():
        raise ValueError(f"not a number written in ASCII: {text!r}")
    return text


def unique_keys(pairs: list) -> dict:
    """An object for ``json.loads(..., object_pairs_hook=unique_keys)``: a key given twice in one object is refused
    (an InputError), where ``json`` would keep its last value without a word (``{"prompt": "a", "prompt": "b"}``
    would be read as the prompt "b")."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise InputError(f"the key {key!r} is given twice in one object")
        obj[key] = value
    return obj


def check_token_ids(ids, vocab_size: int, where: str) -> list[int]:
    """A prompt: a non-empty list of integer ids that the vocabulary has (returned as plain ints)."""
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InputError(f"{where}: token ids must be a list of integers")
    if not ids:
        raise InputError(f"{where}: the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def check_unicode(text: str, what: str) -> None:
    """Refuse text that UTF-8 cannot hold: one with an unpaired surrogate, which JSON's ``"\\ud800"`` escapes make,
    and Python too, of the bytes of a command-line argument that are not UTF-8 (``caf\\xe9`` becomes ``caf\\udce9``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        byte = f" (the byte {ord(char) - 0xDC00:#x} of text that is not UTF-8)" if "\udc80" <= char <= "\udcff" else ""
        raise InputError(f"{what} is not valid Unicode: an unpaired surrogate {char!r} at character {e.start}"
                         f"{byte}") from None


def step_rows(new_tokens, cached) -> tuple[list[list[int]], list[int]]:
    """``OffloadedModel.step``'s arguments as lists: one list of new token ids and one cached count per row."""
    if not is_list(new_tokens) or not all(is_list(row) for row in new_tokens):
        raise InputError("new_tokens must be a list with one list of token ids per KV cache row")
    if not is_list(cached):
        raise InputError(f"cached must be a list with one count of tokens per row, got {cached!r}")
    return [list(row) for row in new_tokens], list(cached)


def new_token_limits(max_new_tokens, rows: int) -> list[int]:
    """``generate``'s ``max_new_tokens`` (one limit, or one per row) as a list of positive integers."""
    limits = list(max_new_tokens) if is_list(max_new_tokens) else [max_new_tokens] * rows
    if len(limits) != rows:
        raise InputError(f"{len(limits)} max_new_tokens values for {rows} prompts")
    for n in limits:
        if not _is_int(n) or n < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {n!r}")
    return limits


def stop_ids(eos_token_id, default: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """``generate``'s ``eos_token_id`` (an id, a list of ids, or None for ``default``) as a tuple."""
    if eos_token_id is None:
        return default
    ids = list(eos_token_id) if is_list(eos_token_id) else [eos_token_id]
    if not all(_is_int(i) and 0 <= i < vocab_size for i in ids):  # (one past the vocabulary would never stop)
        raise InputError(f"eos_token_id must be a token id (0 to {vocab_size - 1}) or a list of them, "
                         f"got {eos_token_id!r}")
    return tuple(ids)


def check_flags(**flags) -> None:
    """Flags are True or False: a string such as "no" would otherwise count as true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")


def as_batch(x, what: str = "input_ids") -> torch.Tensor:
    """``x`` as a ``[batch, seq]`` int64 CPU tensor. Token ids must be integers (a float would be
    truncated silently); a mask may be of any type but must hold only 0 and 1."""
    _check_dense(x, what)
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be numbers of shape [batch, seq]") from None
    if what == "attention_mask":
        if not ((t == 0) | (t == 1)).all():
            raise InputError("attention_mask must hold only 0 and 1")
    elif t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} must hold integers, got {t.dtype}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise InputError(f"expected {what} of shape [batch, seq], got {list(t.shape)}")
    return t.long().cpu()


def prompts_from(input_ids, attention_mask=None) -> list[list[int]]:
    """Each row's ids as a list, padding (mask 0, on either side) dropped."""
    if is_list(input_ids) and not input_ids:
        return []
    if is_ragged(input_ids):
        rows = [_row_of_ids(row, b) for b, row in enumerate(input_ids)]
        if attention_mask is None:
            return rows
        return [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(rows, _row_masks(attention_mask, rows))]
    ids = as_batch(input_ids)
    if attention_mask is None:
        return ids.tolist()
    mask = as_batch(attention_mask, "attention_mask").bool()
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def as_sequences(input_ids, prompts: list[list[int]], new_tokens: list[list[int]], pad: int):
    """HF-style output: a tensor ``[batch, seq + new]``, or lists of prompt + new ids for ragged list input."""
    if is_ragged(input_ids):
        return [p + t for p, t in zip(prompts, new_tokens)]
    ids = as_batch(input_ids)
    width = max(map(len, new_tokens))
    new = torch.tensor([t + [pad] * (width - len(t)) for t in new_tokens], dtype=ids.dtype)
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else "cpu"
    return torch.cat([ids, new], dim=1).to(device)


def _row_of_ids(row, b: int) -> list[int]:
    if not is_list(row):
        raise InputError(f"input_ids row {b}: expected a list of token ids, got {row!r}")
    return [_as_int(t) for t in row]


def _check_dense(x, what: str) -> None:
    """Refuse a tensor whose numbers cannot be read as a plain array: PyTorch's own errors would say otherwise."""
    if not isinstance(x, torch.Tensor):
        return
    if x.device.type == "meta":
        raise InputError(f"{what} is a tensor without data (device meta)")
    if x.layout != torch.strided or x.is_nested:
        raise InputError(f"{what} must be a dense tensor, got a {'nested' if x.is_nested else x.layout} one")


def _row_masks(attention_mask, rows: list[list[int]]) -> list[list[int]]:
    """``attention_mask`` for list rows: one 0 or 1 for each of each row's ids."""
    _check_dense(attention_mask, "attention_mask")
    masks = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
    if not (is_list(masks) and len(masks) == len(rows)
            and all(is_list(m) and len(m) == len(r) for m, r in zip(masks, rows))):
        raise InputError("attention_mask must give each row of input_ids one 0 or 1 per token id")
    if not all(v in (0, 1) and isinstance(v, (int, bool)) for m in masks for v in m):
        raise InputError("attention_mask must hold only 0 and 1")
    return masks


def is_ragged(input_ids) -> bool:
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and isinstance(input_ids[0], (list, tuple))


def is_list(x) -> bool:
    return isinstance(x, (list, tuple))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_int(t) -> int:
    if isinstance(t, int) and not isinstance(t, bool):
        return t
    raise InputError(f"token ids must be integers, got {t!r}")
