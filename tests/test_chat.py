"""Chat templates rendered as transformers renders them, stop tokens from generation_config.json, text streamed
token by token, and the CLI's --chat, "messages" batch records and printing as it generates."""

import json
import random
import shutil

import pytest
import torch
import transformers

import offload
from offload.chat import ChatTemplate, check_messages, stop_token_ids
from offload.cli import generate_showing, main
from offload.scheduler.row_engine import Request
from offload.text import IdText, TextStream, Tokenizer, TooManyTokens

from conftest import CHATML, write_chat_tokenizer

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Whitespace that trim_blocks/lstrip_blocks remove, tojson on HTML and non-ASCII text, a namespace, loop
# controls, and a {% generation %} block.
LAYOUT = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<{{ message.role }}>{{ message.content | tojson }}
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant turn {{ ns.turns }}>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world!"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick brown fox?"},
     {"role": "assistant", "content": " jumps over "}, {"role": "user", "content": "<b>&</b> Grüße, 東京"}],
]


def hf_tokenizer(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("template", [CHATML, LLAMA2, LAYOUT], ids=["chatml", "llama2", "layout"])
def test_rendering_and_ids_equal_transformers(tmp_path, template):
    write_chat_tokenizer(tmp_path, template)
    ours, theirs = Tokenizer.from_dir(tmp_path), hf_tokenizer(tmp_path)
    for messages in CONVERSATIONS:
        if template is LAYOUT:
            messages = [*messages, {"role": "tool", "content": "skipped"}]
        for prompt in (True, False):
            text = ours.chat_template.render(messages, add_generation_prompt=prompt)
            assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == ids


def test_template_file_takes_precedence_and_named_templates(tmp_path):
    write_chat_tokenizer(tmp_path, [{"name": "default", "template": CHATML}, {"name": "other", "template": "x"}])
    messages = CONVERSATIONS[1]
    assert ChatTemplate.from_dir(tmp_path).render(messages) == hf_tokenizer(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    (tmp_path / "chat_template.jinja").write_text(LLAMA2)
    ours = ChatTemplate.from_dir(tmp_path).render(messages)
    assert ours.startswith("<s>[INST] <<SYS>>")
    assert ours == hf_tokenizer(tmp_path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_several_templates_without_a_default_are_refused(tmp_path):
    write_chat_tokenizer(tmp_path, [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}])
    with pytest.raises(offload.ConfigError, match="none named 'default'"):
        ChatTemplate.from_dir(tmp_path)


@pytest.mark.parametrize("source", [5, True, ["{{ messages }}"], {"default": "{{ messages }}"}])
def test_a_template_that_is_not_text_is_refused_in_one_line_when_used(source):
    """A GGUF file's tokenizer.chat_template of another metadata type (Jinja failed on it with a traceback) is
    refused where a chat needs it; the tokenizer beside it still serves plain prompts."""
    template = ChatTemplate(source, name="chat template of x.gguf")
    with pytest.raises(offload.ConfigError, match="chat template of x.gguf is not text but"):
        template.check()


def test_a_refusal_is_an_input_error_and_a_failing_template_a_config_error(tmp_path):
    write_chat_tokenizer(tmp_path, LLAMA2)
    template = ChatTemplate.from_dir(tmp_path)
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(offload.InputError, match="refused these messages: Conversation roles must alternate"):
        template.render(two_users)
    with pytest.raises(Exception, match="roles must alternate"):  # transformers says the same
        hf_tokenizer(tmp_path).apply_chat_template(two_users, tokenize=False)
    with pytest.raises(offload.ConfigError, match="syntax error on line 1"):
        ChatTemplate("{% for m in messages %}").compiled()
    hello = [{"role": "user", "content": "a"}]
    # the template's own faults, whatever the conversation: not the caller's
    with pytest.raises(offload.ConfigError, match="chat template failed [(]TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}").render(hello)
    with pytest.raises(offload.ConfigError, match="failed [(]ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render(hello)
    with pytest.raises(offload.ConfigError, match="failed [(]SecurityError: access to attribute '__class__' of 'str' object is unsafe"):
        ChatTemplate("{{ ''.__class__.__base__.__subclasses__() }}").render(hello)  # the sandbox refuses it
    with pytest.raises(offload.ConfigError, match="failed [(]UndefinedError: 'tool_schema' is undefined"):
        ChatTemplate("{{ tool_schema.name }}").render(hello)
    assert ChatTemplate.from_dir(tmp_path.parent / "no-such-dir") is None


def test_a_template_is_checked_on_a_one_message_conversation(tmp_path):
    write_chat_tokenizer(tmp_path, LLAMA2)
    ChatTemplate.from_dir(tmp_path).check()  # refuses only some conversations: fine
    ChatTemplate(CHATML).check()
    with pytest.raises(offload.ConfigError, match="failed [(]ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").check()
    with pytest.raises(offload.ConfigError, match="refused these messages: no chats; a template must lay out"):
        ChatTemplate("{{ raise_exception('no chats') }}").check()


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "x"}], "'role' must be a string"),
    ([{"role": "user", "content": 3}], "'content' must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": None}], r"messages\[0\]: 'content' is missing or null"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\]: 'content' is missing or null"),
])
def test_bad_messages(messages, words):
    with pytest.raises(offload.InputError, match=words):
        check_messages(messages)


def test_text_parts_are_joined_and_nulls_dropped():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert check_messages([{"role": "user", "content": parts, "name": None}]) == [
        {"role": "user", "content": "one\ntwo"}]


def test_stop_tokens_from_both_configs(tmp_path):
    assert stop_token_ids(tmp_path, (2,)) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert stop_token_ids(tmp_path, (2,)) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(offload.ConfigError, match="eos_token_id"):
        stop_token_ids(tmp_path, (2,))


# ---------------------------------------------------------------------- text streamed token by token


def test_streamed_text_equals_decoding_at_once(tiny):
    tokenizer = Tokenizer.from_dir(tiny)
    gen = torch.Generator().manual_seed(0)
    prompt = tokenizer.encode("The quick brown")
    for _ in range(20):  # random ids: bytes of characters split over tokens, ids the tokenizer does not know
        ids = torch.randint(0, 600, (40,), generator=gen).tolist()
        stream = TextStream(tokenizer, prompt=prompt)
        pieces = [stream.add(t) for t in ids] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids)
    text = "Grüße aus 東京"
    stream = TextStream(tokenizer)
    pieces = [stream.add(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) + stream.finish() == text
    assert all("\ufffd" not in p for p in pieces)  # a character is shown once its last byte is in
    whole = tokenizer.encode(text)
    for cut in range(1, len(whole)):  # a prompt that ends inside a character: as the output decoded at once
        stream = TextStream(tokenizer, prompt=whole[:cut])
        pieces = [stream.add(t) for t in whole[cut:]] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(whole[cut:]), cut


def byte_fallback_tokenizer() -> Tokenizer:
    """A Llama 2-style SentencePiece tokenizer: ▁ for spaces, <0xNN> tokens for characters not in its vocabulary
    (each emoji is four), a decoder that strips the leading space of what it decodes."""
    from tokenizers import Tokenizer as Inner, decoders, models, normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate("▁Helowrd")})
    inner = Inner(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    inner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(content=" ", left=1, right=0)])
    inner.add_special_tokens(["<s>"])
    return Tokenizer(inner)


@pytest.mark.parametrize("prompt", ["Hello 😀😀", "Hello 😀", "😀😀", "Hello"])
def test_a_new_word_after_a_prompt_ending_in_byte_tokens_keeps_its_space(prompt):
    """The last tokens of "Hello 😀😀" begin inside the first emoji, where a byte-fallback decoder shows the whole
    run of bytes as U+FFFD: the prompt's context was dropped, and with it the space of the new word " world"."""
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode(prompt)
    new = tokenizer.encode(" world")[1:]  # ▁world: a new word (the first ▁ is the one the normalizer prepends)
    stream = TextStream(tokenizer, prompt=ids)
    text = "".join(stream.add(t) for t in new) + stream.finish()
    assert tokenizer.decode(ids + new) == prompt + " world"
    assert text == " world"


def test_characters_of_byte_tokens_after_special_tokens_stream_whole():
    """Special tokens (decoded as nothing) move the window of what is decoded on: two after an emoji of four byte
    tokens moved it inside the emoji, and a byte-fallback decoder then showed the next character's bytes as
    U+FFFD too ("😀���" where decoding at once gives "😀東")."""
    tokenizer = byte_fallback_tokenizer()
    special = tokenizer.inner.token_to_id("<s>")
    for run in range(1, 8):
        ids = tokenizer.encode("😀")[1:] + [special] * run + tokenizer.encode("東 Hello")[1:]
        stream = TextStream(tokenizer)
        text = "".join(stream.add(t) for t in ids) + stream.finish()
        assert text == tokenizer.decode(ids) == "😀東 Hello", run


def test_a_long_run_of_tokens_without_text_is_streamed_in_bounded_decodes(tiny_chat):
    """Special tokens decode to nothing: a run of thousands (a model stuck on one) costs a decode of a few tokens
    each, not of the whole run (quadratic), and the text still equals decoding at once."""
    tokenizer = Tokenizer.from_dir(tiny_chat)
    special = tokenizer.inner.token_to_id("<|im_start|>")
    ids = (tokenizer.encode("Grüße aus", special=False) + [special] * 2000
           + tokenizer.encode(" 東京 ok", special=False))
    stream, widest = TextStream(tokenizer), 0
    pieces = []
    for t in ids:
        pieces.append(stream.add(t))
        widest = max(widest, len(stream.ids) - stream.start)
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids) == "Grüße aus 東京 ok"
    assert widest <= 16


def test_stop_strings_end_the_text_before_them():
    stream = TextStream(IdText(), stop=["<3><4>", "<9>"])
    pieces = [stream.add(t) for t in [1, 3, 5, 3, 4, 6]]
    assert pieces == ["<1>", "", "<3><5>", "", "", ""]  # "<3>" waits: it may begin "<3><4>"
    assert stream.stopped and stream.finish() == ""
    stream = TextStream(IdText(), stop=["<3><4>"])
    assert [stream.add(t) for t in [1, 3]] == ["<1>", ""] and stream.finish() == "<3>"


# ---------------------------------------------------------------------- the CLI


def greedy(model_dir, ids, n, eos=None):
    model = offload.load_model(model_dir, max_seq_len=128, progress=False)
    return model.generate([ids], max_new_tokens=n, eos_token_id=eos, return_result=True)


def test_cli_chat_prompt_uses_the_template_and_prints_as_it_generates(tiny_chat, capsys):
    tokenizer = Tokenizer.from_dir(tiny_chat)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    want = greedy(tiny_chat, ids, 12)
    assert main(["--model", str(tiny_chat), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    prompt = next(i for i, line in enumerate(lines) if line.startswith("prompt: "))
    assert lines[prompt] == f"prompt: {tokenizer.decode(ids, special=True)!r} ({len(ids)} tokens)"
    assert "<|im_start|>user" in lines[prompt]  # the template's markers are shown
    assert "<|im_start|>assistant" in tokenizer.inner.decode(ids, skip_special_tokens=False)
    tokens = want.tokens[0]
    shown = tokens[:-1] if want.finish_reasons[0] == "eos" else tokens
    assert lines[prompt + 1] == tokenizer.decode(shown)  # the streamed line, then the summary lines
    assert lines[prompt + 3] == f"output ids: {','.join(map(str, tokens))} ({want.finish_reasons[0]})"


def test_a_single_prompt_is_shown_token_by_token(tiny):
    model = offload.load_model(tiny, max_seq_len=64, progress=False)
    tokenizer = Tokenizer.from_dir(tiny)
    shown = []
    row, stats = generate_showing(model, Request((5, 6, 7), 10), tokenizer, shown.append)
    assert len(row.tokens) == 10 and stats.decode_tokens == 9
    assert "".join(shown) == tokenizer.decode(row.tokens) + "\n"
    assert sum(bool(piece) for piece in shown) >= 5  # shown as it came, not once at the end


def test_cli_stops_at_generation_config_eos(tiny, tmp_path, capsys):
    ids = [5, 6, 7, 8]
    tokens = greedy(tiny, ids, 8).tokens[0]
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": tokens[3]}))
    assert main(["--model", str(model), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    stop = tokens.index(tokens[3]) + 1
    assert f"output ids: {','.join(map(str, tokens[:stop]))} (eos)" in out


@pytest.mark.parametrize("argv, words", [
    (["--chat", "--prompt-ids", "1,2"], "--chat goes with --prompt"),
    (["--chat", "--prompt", "hi"], "no chat template"),
])
def test_cli_chat_errors(tiny, capsys, argv, words):
    assert main(["--model", str(tiny), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_a_template_file_that_is_not_text_is_one_line_and_a_folder_of_that_name_no_template(tiny, tmp_path, capsys):
    """chat_template.jinja in another encoding failed with a traceback; tokenizer_config.json's such bytes were
    one line already."""
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "folder.jinja").mkdir()
    assert ChatTemplate.from_dir(model) is None
    (model / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    assert main(["--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat_template.jinja: not a readable chat template (UnicodeDecodeError" in err


def test_batch_records_with_messages(tiny_chat, tmp_path):
    messages = [[{"role": "user", "content": "Hello"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]]
    lines = [{"id": i, "messages": m, "max_new_tokens": 6} for i, m in enumerate(messages)]
    lines.append({"id": "plain", "prompt": "The quick brown", "max_new_tokens": 6})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["--model", str(tiny_chat), "--prompts", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--batch-size", "2", "--max-step-tokens", "64", "--quiet"]) == 0
    job, *records = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())  # the job line first
    got = {r["id"]: r["output_ids"] for r in records}
    tokenizer = Tokenizer.from_dir(tiny_chat)
    prompts = [tokenizer.apply_chat_template(m) for m in messages] + [tokenizer.encode("The quick brown")]
    model = offload.load_model(tiny_chat, max_batch=3, max_seq_len=64, progress=False)
    want = model.generate(prompts, max_new_tokens=6, return_result=True).tokens
    assert [got[0], got[1], got["plain"]] == want


def test_batch_messages_errors_name_the_line(tiny, tiny_chat, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt_ids": [1]}\n{"id": 2, "messages": [{"role": 1}]}\n')
    for model, words in ((tiny_chat, "'role' must be a string"), (tiny, "no chat template")):
        assert main(["--model", str(model), "--prompts", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'in.jsonl'}:2:" in err and words in err, err


@pytest.mark.parametrize("most", [1, 5, 40, 200])
def test_a_text_far_past_its_room_is_found_out_from_its_beginning(tiny_chat, most):
    """encode(text, most) gives encode(text), or raises TooManyTokens, and then only for a text of more than
    ``most`` tokens, whatever the text: words, runs of spaces, one long word cut anywhere, other scripts."""
    tokenizer = Tokenizer.from_dir(tiny_chat)
    rng = random.Random(most)
    words = ["the", "quick", "brown", "fox", " ", "    ", "\n", "東京", "Grüße", "x" * 700, "ab" * 300, "😀"]
    refused = 0
    for _ in range(60):
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 400)))
        whole = tokenizer.encode(text)
        try:
            ids = tokenizer.encode(text, most=most)
        except TooManyTokens as e:
            refused += 1
            assert len(whole) > e.at_least >= most, (len(whole), e.at_least, most)
        else:
            assert ids == whole
    assert refused > 0 or most < 40  # below, no head is CUT_TOKENS past its room: every text is tokenized whole



def test_a_text_part_without_its_text_is_named_as_such():
    from offload.chat import _texts
    from offload.errors import InputError

    with pytest.raises(InputError, match=r"content\[1\]: a text part needs its text as a string"):
        _texts([{"type": "text", "text": "hi"}, {"type": "text"}], "messages[0].content")
    with pytest.raises(InputError, match="only text parts are supported, got 'image_url'"):
        _texts([{"type": "image_url"}], "messages[0].content")


LIST_ONLY = (  # a template for parts alone: a string's characters would be taken for parts (and dropped)
    "{% for message in messages %}<{{ message['role'] }}>{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}\n{% endfor %}")
FIRST_PART = (  # Gemma 3's system message: a string, or the first part's text
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'][0]['text'] }}{% endif %}|{% endfor %}{% for m in [] %}{% for x in m.content %}"
    "{% endfor %}{% endfor %}")
MIXED = (  # Mistral's: parts looped over in user turns, strings added to strings in the others
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for block in m.content %}{{ block.text }}{% endfor %}{% endif %}[/INST]{% else %}"
    "{{ '[SYS]' + m.content + '[/SYS]' }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template, want", [
    (LIST_ONLY, "<system>Rule one.\nRule two.<user>Hello \n world"),  # (trim_blocks: no newline after a tag)
    (FIRST_PART, "Rule one.\nRule two.|Hello \n world|"),
    (MIXED, "[SYS]Rule one.\nRule two.[/SYS][INST]Hello \n world[/INST]"),
    (CHATML, "<|im_start|>system\nRule one.\nRule two.<|im_end|>\n<|im_start|>user\nHello \n world<|im_end|>\n"
             "<|im_start|>assistant\n"),
], ids=["list-only", "first-part", "mixed", "strings"])
def test_content_parts_reach_every_template_whole(tmp_path, template, want):
    """OpenAI's text parts, joined by newlines: as one part of a list for a template that loops over parts (a
    string's characters would be taken for parts), as a string for one written for strings, and as a string
    again where a template that loops over parts somewhere adds a string to them elsewhere (Mistral's)."""
    write_chat_tokenizer(tmp_path, template)
    ours = Tokenizer.from_dir(tmp_path)
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    messages = [{"role": "system", "content": parts("Rule one.", "Rule two.")},
                {"role": "user", "content": parts("Hello ", " world")}]
    assert ours.chat_template.render(messages) == want


def test_generate_stops_at_generation_configs_eos_as_the_cli_does(tiny, tmp_path):
    """``model.generate`` stops where transformers' generate and offload's CLI and server stop: at
    generation_config.json's eos ids too (it stopped at config.json's alone)."""
    import json
    import shutil

    import torch

    import offload

    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(dtype=torch.float32, max_seq_len=32, progress=False)
    with offload.load_model(tiny, **kw) as model:
        free = model.generate(ids, max_new_tokens=8, ignore_eos=True)[0, 4:].tolist()
    stop = free[3]
    copy = tmp_path / "tiny"
    shutil.copytree(tiny, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    with offload.load_model(copy, **kw) as model:
        assert stop in model.config.eos_token_ids
        tokens = model.generate(ids, max_new_tokens=8)[0, 4:].tolist()
    assert tokens[: free.index(stop) + 1] == free[: free.index(stop) + 1] and stop not in tokens[free.index(stop) + 1:]
    assert stop_token_ids(copy, model.config.eos_token_ids) == model.config.eos_token_ids


def test_a_plain_prompt_gets_the_bos_its_tokenizer_adds_and_a_chat_none_beyond_its_template(tiny_chat, tmp_path):
    """A tokenizer.json whose post-processor puts <s> first (Llama's, Mistral's): a plain prompt starts with it,
    as transformers and llama.cpp encode one, from the CLI, a batch file and the server alike (one encode); a
    conversation gets only what its template writes, as transformers' apply_chat_template does."""
    from tokenizers import Tokenizer as Inner, processors

    from offload.batch import _prompt_ids
    from offload.cli import build_parser, _single_prompt

    model = shutil.copytree(tiny_chat, tmp_path / "model")
    inner = Inner.from_file(str(model / "tokenizer.json"))
    bos = inner.token_to_id("<s>")
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", bos)])
    inner.save(str(model / "tokenizer.json"))
    mine, theirs = Tokenizer.from_dir(model), transformers.AutoTokenizer.from_pretrained(model)
    text, messages = "The quick brown fox", [{"role": "user", "content": "Hello"}]
    assert mine.encode(text) == theirs(text).input_ids and mine.encode(text)[0] == bos
    assert mine.encode(text, special=False) == mine.encode(text)[1:]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert mine.apply_chat_template(messages) == theirs(rendered, add_special_tokens=False).input_ids  # as theirs
    assert mine.apply_chat_template(messages)[0] != bos
    args = build_parser().parse_args(["--model", str(model), "--prompt", text])
    assert _single_prompt(args, mine, demo=False) == mine.encode(text)
    assert _prompt_ids({"prompt": text}, "line 1", mine, 2048) == mine.encode(text)
