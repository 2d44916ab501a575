"""Chat templates and stop tokens: how an instruct checkpoint says to lay out a conversation, and when to stop.

An instruct model answers well only when its prompt looks like its training
conversations: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`` for one
model, ``<s>[INST] ... [/INST]`` for another. The checkpoint carries that layout as
a Jinja template, in ``chat_template.jinja`` (and ``additional_chat_templates/*.jinja``)
or under ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
templates). :class:`ChatTemplate` renders it the way ``transformers``'
``apply_chat_template`` does: a sandboxed environment, ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, a ``tojson`` that does not escape HTML,
``strftime_now``, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...)
as strings.

Its stop tokens are in two files: ``config.json``'s ``eos_token_id`` and
``generation_config.json``'s (Llama 3 instruct ends a turn with ``<|eot_id|>``, which
only the latter names): :func:`stop_token_ids` reads both.

Needs ``jinja2`` (the ``text`` extra) to render; reading the files does not.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import ConfigError, InputError
from .inputs import check_unicode
from .models.config import read_json_object, stop_ids_of

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateRefusal(Exception):
    """A template's ``raise_exception(message)``: the template refuses the conversation it was given."""


class ChatTemplate:
    """A checkpoint's chat template and the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "chat template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.name = name  # where it came from, for error messages
        self._compiled = None
        self._reads_parts = False  # whether it loops over a message's content parts itself (set by compiled())

    @classmethod
    def from_dir(cls, path) -> "ChatTemplate | None":
        """The template of the checkpoint in ``path``, or None when it has none.

        As ``transformers`` reads them: template files take precedence over
        ``tokenizer_config.json``; of several named templates, the one named ``default``.
        """
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        templates = _template_files(path) or _config_templates(config, path / "tokenizer_config.json")
        if not templates:
            return None
        if len(templates) == 1:
            (name, source), = templates.items()
        elif "default" in templates:
            name, source = "default", templates["default"]
        else:
            raise ConfigError(f"{path}: several chat templates ({', '.join(sorted(templates))}) and none named "
                              "'default'")
        return cls(source, _special_tokens(config, _read_json(path / "special_tokens_map.json")),
                   name=f"chat template {name!r} of {path.name}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; with ``add_generation_prompt``, ready for its answer.

        Messages that are not a conversation raise InputError, and so does a conversation the
        template refuses with its ``raise_exception`` (roles out of order, say): the caller's
        fault. The template failing in any other way (a division by zero, a sandbox refusal, a
        variable it lacks) is the checkpoint's fault: ConfigError, naming the template.
        """
        template = self.compiled()
        checked = check_messages(messages, parts=self._reads_parts)
        try:
            return self._render(template, checked, add_generation_prompt)
        except ConfigError:  # a template that loops over parts somewhere may add a string to them elsewhere
            plain = check_messages(messages)
            if plain == checked:
                raise
            return self._render(template, plain, add_generation_prompt)

    def _render(self, template, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateRefusal as e:
            raise InputError(f"{self.name} refused these messages: {e}") from None
        except Exception as e:  # whatever else a template's code raises, the template is at fault
            reason = getattr(e, "message", None) or e  # a Jinja error's own message, without its location
            raise ConfigError(f"{self.name} failed ({type(e).__name__}: {reason})") from None

    def check(self) -> None:
        """Render a one-message conversation, so that a template that cannot is refused (ConfigError) at load
        rather than at the first chat."""
        try:
            self.render([{"role": "user", "content": "Hello!"}])
        except InputError as e:  # refused: no conversation could be laid out
            raise ConfigError(f"{e}; a template must lay out a one-message conversation") from None

    def compiled(self):
        """The compiled template (compiled once); a syntax error raises ConfigError, a missing jinja2 InputError."""
        if self._compiled is None:
            if not isinstance(self.source, str):  # (a file's metadata of another type: Jinja failed with a traceback)
                raise ConfigError(f"{self.name} is not text but {type(self.source).__name__} "
                                  f"{str(self.source)[:40]!r}")
            try:
                import jinja2
            except ImportError:
                raise InputError("chat templates need jinja2: pip install -e '.[text]'") from None
            try:
                environment = _environment()
                self._compiled = environment.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{self.name}: syntax error on line {e.lineno}: {e.message}") from None
            self._reads_parts = _iterates_content(environment.parse(self.source))
        return self._compiled


ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's chat roles


def check_roles(messages: list, where: str = "messages") -> None:
    """Refuse a message whose role OpenAI's API does not have (templates would lay out any role they are given):
    what the server and batch records accept."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role not in ROLES:
            raise InputError(f"{where}[{i}].role {role!r} is not one of {', '.join(ROLES)}")


def check_messages(messages, where: str = "messages", parts: bool = False) -> list[dict]:
    """A conversation as templates expect it: a non-empty list of ``{"role": str, "content": ...}`` objects.

    Every message has content. Other keys whose value is null are dropped (``transformers``
    does the same: templates test for a key, not for None), and OpenAI-style content parts
    ``[{"type": "text", "text": ...}]`` (text parts only) are joined into one string, so templates
    written for plain strings read them; with ``parts`` (a template that loops over them itself,
    as Gemma 3's does), into one part of a list (a template may read only the first part).
    """
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"{where}[{i}] must be an object with 'role' and 'content'")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise InputError(f"{where}[{i}]: 'role' must be a string")
        content = message.get("content")
        if content is None:  # a template would fail on it with a message of its own, about its internals
            raise InputError(f"{where}[{i}]: 'content' is missing or null; give a string or a list of text parts")
        if isinstance(content, list):
            texts = _texts(content, f"{where}[{i}].content")
            text = "\n".join(texts)
            message["content"] = [{"type": "text", "text": text}] if parts else text
        elif not isinstance(content, str):
            raise InputError(f"{where}[{i}]: 'content' must be a string or a list of text parts")
        for key in ("role", "content"):
            if isinstance(message.get(key), str):
                check_unicode(message[key], f"{where}[{i}].{key}")
        out.append(message)
    return out


def _texts(parts: list, where: str) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InputError(f"{where}[{j}]: only text parts are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise InputError(f"{where}[{j}]: a text part needs its text as a string (\"text\": \"...\")")
        texts.append(part["text"])
    return texts


def _iterates_content(ast) -> bool:
    """Whether a template (its parsed ``ast``) loops over a message's content itself (``{% for part in
    message['content'] %}``, or over a variable set to it): then it reads OpenAI's content parts (as vLLM
    detects such templates), where a string's characters would be taken for parts."""
    from jinja2 import nodes

    def content(node) -> bool:
        while isinstance(node, nodes.Filter):
            node = node.node
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
                or isinstance(node, nodes.Getattr) and node.attr == "content")

    named = {a.target.name for a in ast.find_all(nodes.Assign)
             if isinstance(a.target, nodes.Name) and content(a.node)}
    for loop in ast.find_all(nodes.For):
        over = loop.iter
        while isinstance(over, nodes.Filter):
            over = over.node
        if content(over) or isinstance(over, nodes.Name) and over.name in named:
            return True
    return False


def stop_token_ids(path, config_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The ids that end generation: ``config_eos`` (config.json's) and generation_config.json's ``eos_token_id``
    (a GGUF file's are its config's)."""
    return stop_ids_of(path, config_eos) if Path(path).is_dir() else tuple(config_eos)


# ---------------------------------------------------------------------- reading the files


def _read_json(file: Path) -> dict:
    return read_json_object(file) if file.is_file() else {}


def _template_files(path: Path) -> dict[str, str]:
    templates = {}
    if (path / TEMPLATE_FILE).is_file():
        templates["default"] = _read_template(path / TEMPLATE_FILE)
    if (path / TEMPLATE_DIR).is_dir():
        for file in sorted((path / TEMPLATE_DIR).glob("*.jinja")):
            if file.is_file():  # a folder or a pipe of that name is no template (a pipe's read would never end)
                templates[file.name.removesuffix(".jinja")] = _read_template(file)
    return templates


def _read_template(file: Path) -> str:
    """A template file's text; one that is not UTF-8 or cannot be read is the checkpoint's fault, in one line."""
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not a readable chat template ({type(e).__name__}: {str(e)[:200]})") from None


def _config_templates(config: dict, file: Path) -> dict[str, str]:
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ConfigError(f"{file}: chat_template must be a string or a list of {{'name', 'template'}} objects")


def _special_tokens(config: dict, legacy_map: dict) -> dict[str, str]:
    """``bos_token`` and the like as strings; tokenizer_config.json's, else special_tokens_map.json's."""
    out = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key, legacy_map.get(key))
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


# ---------------------------------------------------------------------- the Jinja environment


def _environment():
    """The environment ``transformers`` renders chat templates in (templates are untrusted: sandboxed)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's turns in training templates;
        rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise TemplateRefusal(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
