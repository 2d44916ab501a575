"""Text in and out, through the optional ``tokenizers`` package and a checkpoint's ``tokenizer.json``.

Token ids are the interface everywhere else; text is a convenience of the CLI,
batch jobs and the server. A checkpoint of random weights (``make_checkpoint.py``)
gets a small byte-level BPE tokenizer; ids it does not know (the model's
vocabulary is usually larger) are shown as ``<id>``. A checkpoint's chat template
(``offload/chat.py``) comes with its tokenizer.

:class:`TextStream` turns tokens arriving one at a time into text that can be
shown at once: what the CLI prints while it generates and the server streams.
"""

from __future__ import annotations

from pathlib import Path

from .chat import ChatTemplate
from .errors import InputError
from .inputs import check_unicode

REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of a character that is not complete yet
CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new token (a leading space may depend on them)
CHAR_TOKENS = 4  # the most tokens one character's bytes span (UTF-8 has at most 4 bytes a character)
HEAD_CHARS_PER_TOKEN = 16  # a text is counted from its first 16 characters per token of room (English: about 4)
CUT_TOKENS = 64  # what cutting a text inside a word can add to the tokens of its head, at most


class TooManyTokens(InputError):
    """A text that has more tokens than it may, found out from its beginning: it has ``at_least`` of them."""

    def __init__(self, at_least: int, most: int):
        super().__init__(f"the prompt has more than {at_least} tokens, and at most {most} fit")
        self.at_least, self.most = at_least, most


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that never drops an id when decoding."""

    def __init__(self, inner, chat_template: ChatTemplate | None = None):
        self.inner = inner
        # Ids run to the largest the vocabulary has, which may have holes (a GGUF vocabulary that repeats a token
        # keeps the first id of its text): counting its tokens would take the last ids for unknown ones, and
        # ``tokenizers`` drops a hole's id from what it decodes without a word.
        ids = inner.get_vocab(with_added_tokens=True).values()
        self.size = max(ids, default=-1) + 1
        self.holes = frozenset(range(self.size)).difference(ids) if len(ids) < self.size else frozenset()
        self.chat_template = chat_template

    @classmethod
    def from_checkpoint(cls, path) -> "Tokenizer | None":
        """The tokenizer of a checkpoint directory (:meth:`from_dir`) or of a GGUF file (its vocabulary and chat
        template), or None when it has none or ``tokenizers`` is missing."""
        from .models.checkpoint import is_gguf

        if is_gguf(path):
            from .gguf import GGUFCheckpoint

            checkpoint = GGUFCheckpoint(path)
            try:
                return checkpoint.tokenizer()
            finally:
                checkpoint.close()
        return cls.from_dir(path)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        """The tokenizer in ``path/tokenizer.json`` with the checkpoint's chat template (if any), or None when
        there is no tokenizer.json or ``tokenizers`` is missing."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            return None
        try:
            from tokenizers import Tokenizer as Inner
        except ImportError:
            return None
        try:
            inner = Inner.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception types
            raise InputError(f"{file}: not a readable tokenizer ({e})") from None
        return cls(inner, ChatTemplate.from_dir(path))

    def encode(self, text: str, most: int | None = None, special: bool = True) -> list[int]:
        """The ids of ``text``, with the special tokens the tokenizer adds to a text (a BOS where it says so, as
        ``transformers`` and llama.cpp do for a plain prompt); ``special`` False: none (a chat template writes its
        own). With ``most``, a text far longer than ``most`` tokens raises TooManyTokens having tokenized only its
        beginning: a body of megabytes then costs milliseconds, not a second of a core."""
        check_unicode(text, "the prompt")
        head = text if most is None else text[: HEAD_CHARS_PER_TOKEN * most]
        if len(head) < len(text):
            # Words wholly in the head are tokenized as in the whole text; the word cut at its end may add tokens.
            counted = len(self._encoding(head, special))
            if counted > most + CUT_TOKENS:
                raise TooManyTokens(counted - CUT_TOKENS, most)
        return self._encoding(text, special).ids

    def _encoding(self, text: str, special: bool):
        # encode_batch lets go of the GIL while it tokenizes (encode holds it throughout): a long prompt tokenized
        # on a worker thread of the server then leaves its event loop free.
        return self.inner.encode_batch([text], add_special_tokens=special)[0]

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of ``ids``; ``special``: with special tokens such as a chat template's markers."""
        out, run = [], []
        for i in ids:
            if 0 <= i < self.size and i not in self.holes:
                run.append(i)
                continue
            if run:
                out.append(self.inner.decode(run, skip_special_tokens=not special))
                run = []
            out.append(f"<{i}>")
        if run:
            out.append(self.inner.decode(run, skip_special_tokens=not special))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            most: int | None = None) -> list[int]:
        """The token ids of a conversation laid out by the model's chat template (as ``transformers`` does:
        the template writes any special tokens, so none are added); ``most`` as for :meth:`encode`."""
        if self.chat_template is None:
            raise InputError("this model has no chat template (chat_template in tokenizer_config.json, or "
                             "chat_template.jinja): it takes plain prompts only")
        return self.encode(self.chat_template.render(messages, add_generation_prompt), most, special=False)


class IdText:
    """Text for a model without a tokenizer: ids are shown as ``<id>``; text cannot be encoded."""

    chat_template = None

    def encode(self, text: str, most: int | None = None, special: bool = True) -> list[int]:
        raise InputError("this model has no tokenizer (tokenizer.json and the tokenizers package); "
                         "send token ids instead of text")

    def decode(self, ids: list[int], special: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            most: int | None = None) -> list[int]:
        raise InputError("this model has no tokenizer (tokenizer.json and the tokenizers package), so no chat "
                         "template; send token ids to /v1/completions")


class TextStream:
    """The text of tokens that arrive one at a time, released as soon as it is final.

    A token decoded alone can be wrong: a character's bytes may span tokens, and a
    tokenizer may drop a leading space at the start of what it decodes. So each new
    token is decoded together with the tokens since the last release (and, for the
    first one, the end of the prompt) and only the new text is kept, as vLLM and
    text-generation-inference do; text ending in an incomplete character waits for the
    next token. With ``stop`` strings, text that may be the start of one waits too, and
    the text ends just before the first one found (``stopped`` is then True).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = (), prompt: list[int] | tuple = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids = _prompt_context(tokenizer, prompt)
        self.start = 0  # each decode starts here
        self.released = len(self.ids)  # tokens whose text has been released
        self.held = ""  # decoded, but it may begin a stop string
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that is final once ``token`` is added ('' while it may still change)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        return self._decode(final=False)

    def finish(self) -> str:
        """The rest, once no more tokens come (an incomplete character as it decodes)."""
        return "" if self.stopped else self._decode(final=True)

    def _decode(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start : self.released])
        after = self.tokenizer.decode(self.ids[self.start :])
        if not final and after == before:  # no text at all (special tokens skipped): the window moves on, so that
            self.released = len(self.ids)  # a long run of them costs a decode of its last few tokens, not all
            self.start = _char_start(self.tokenizer, self.ids, max(self.start, self.released - CONTEXT_TOKENS),
                                     self.start)
            return ""
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        self.start, self.released = self.released, len(self.ids)
        return self._release(after[len(before) :], final)

    def _release(self, text: str, final: bool) -> str:
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        keep = 0 if final else _stop_prefix_length(self.held, self.stop)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out


def _prompt_context(tokenizer, prompt) -> list[int]:
    """The end of ``prompt`` that the first new token is decoded after: its last CONTEXT_TOKENS tokens, from the
    start of a character, less the end of a character the prompt ends inside."""
    prompt = list(prompt[-(CONTEXT_TOKENS + CHAR_TOKENS - 1):])
    ids = prompt[_char_start(tokenizer, prompt, max(0, len(prompt) - CONTEXT_TOKENS)):]
    while ids and tokenizer.decode(ids).endswith(REPLACEMENT):
        ids.pop()  # a prompt ending inside a character: its rest decodes as decoding the output alone does
    return ids


def _char_start(tokenizer, ids: list[int], start: int, floor: int = 0) -> int:
    """``start``, moved back (by at most CHAR_TOKENS - 1 tokens, to ``floor`` at most) to where ``ids`` decode
    from the start of a character. A SentencePiece byte-fallback decoder shows every byte of a run of byte tokens
    as U+FFFD when the run starts inside a character: the last 5 tokens of "...😀😀" begin with the first emoji's
    last byte, and a window that began there would also spoil the bytes of the characters that follow."""
    for _ in range(CHAR_TOKENS - 1):
        if start <= floor or not tokenizer.decode(ids[start:]).startswith(REPLACEMENT):
            break
        start -= 1
    return start


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
