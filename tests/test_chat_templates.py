"""ChatFormat against the real chat templates of the paper's model families.

Each template (``tests/data/chat_templates/*.jinja``, copied from the model's
``tokenizer_config.json``; sources in that folder's README) is installed on a copy of the
built-in model's byte-level BPE tokenizer with the family's special tokens added and a
``generation_config.json`` beside it, so the checks run offline on real tokenizer machinery.

The vocabulary is SmolLM2's, but the pre-tokenizer is the family's own split pattern where it
decides where a prompt ends and an answer begins (Qwen2/2.5/3 and Llama 3 keep a run of
newlines in one piece whatever follows; GPT-2's pattern, SmolLM2's, splits "\n\n" before a
digit but not at the end of a text).

The contract: the ids r3 builds (``prompt`` + the model's attempt + ``user_turn`` + reflection +
``user_turn``) tokenise exactly as the template's rendering of that whole conversation, the
end-of-turn token the template writes after an assistant message is a stop id, and so are the
checkpoint's generation eos ids.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from r3.chat import ChatFormat
from r3.errors import R3Error

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# family -> special tokens to add, bos, eos (tokenizer_config.json), generation_config eos tokens
FAMILIES = {
    "qwen2": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "qwen25": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"], None, "<|im_end|>",
              ["<|im_end|>", "<|endoftext|>"]),
    "qwen35": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    "llama31": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>",
                ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "llama32": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>",
                ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "phi35": (["<s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>", "<|endoftext|>",
              ["<|end|>", "<|assistant|>", "<|endoftext|>"]),
    "mistral_v03": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", ["</s>"]),
    "mistral_small31": (["<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "<s>", "</s>",
                        ["</s>"]),
    "gemma3": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    "gemma2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    "gemma4": (["<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>",
                "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'], "<bos>", "<eos>",
               ["<eos>", "<turn|>"]),
    "smollm3": (["<|im_start|>", "<|im_end|>", "<|end_of_text|>", "<think>", "</think>"], None, "<|im_end|>",
                ["<|im_end|>"]),
    "olmo2": (["<|endoftext|>", "<|pad|>"], "<|endoftext|>", "<|endoftext|>", ["<|endoftext|>"]),
    # (the generation eos is <|endoftext|> alone here: the template's <|im_end|> must become a stop id by itself)
    "olmo31": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"], None, "<|endoftext|>", ["<|endoftext|>"]),
    "granite33": (["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"], "<|end_of_text|>",
                  "<|end_of_text|>", ["<|end_of_text|>"]),
    "deepseek_r1_distill": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"]),
}
# Special tokens the family's tokenizer adds with rstrip (they absorb the whitespace after them):
# Phi-3's chat tokens, as its tokenizer_config.json's added_tokens_decoder lists them.
RSTRIP = {"phi35": {"<|end|>", "<|user|>", "<|assistant|>", "<|system|>"}}
# Tokens added as plain (not special) tokens, as in the family's tokenizer: decoding keeps them.
PLAIN_ADDED = {"deepseek_r1_distill": ["<think>", "</think>"]}
# What the template writes after an assistant message (the token r3 must stop at).
END_OF_TURN = {"qwen2": "<|im_end|>", "qwen25": "<|im_end|>", "qwen3": "<|im_end|>", "qwen35": "<|im_end|>", "smollm3": "<|im_end|>", "olmo2": "<|endoftext|>", "olmo31": "<|im_end|>", "granite33": "<|end_of_text|>", "llama31": "<|eot_id|>",
               "llama32": "<|eot_id|>", "phi35": "<|end|>", "mistral_v03": "</s>", "mistral_small31": "</s>",
               "smollm2": "<|im_end|>",
               "gemma3": "<end_of_turn>", "gemma2": "<end_of_turn>", "gemma4": "<turn|>", "deepseek_r1_distill": "<｜end▁of▁sentence｜>"}
# Templates that trim the text of every message (the model's replies too).
TRIMS = ("llama31", "llama32", "gemma3", "gemma2", "gemma4", "qwen35")
# Text the template writes between the generation prompt and the assistant's message (the model
# writes it itself: Mistral puts a space before the answer).
LEAD = {"mistral_v03": " "}
# The families' pre-tokenizer split patterns (tokenizer.json), applied before byte-level BPE.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# (Qwen 3.5 gets Qwen 2-3's pattern: its own tokenizer.json was not reachable; what matters here is
# that a run of newlines stays one piece, which its generation prompt's "</think>\n\n" relies on)
SPLIT = {"qwen2": QWEN_SPLIT, "qwen25": QWEN_SPLIT, "qwen3": QWEN_SPLIT, "qwen35": QWEN_SPLIT, "llama31": LLAMA3_SPLIT,
         "llama32": LLAMA3_SPLIT, "olmo2": LLAMA3_SPLIT, "olmo31": LLAMA3_SPLIT, "deepseek_r1_distill": QWEN_SPLIT}

QUERY = "Write an equation that uses 12 and 7 once each and equals 19."
ATTEMPT = "12 - 7 = 5"
REFLECT = "Your answer is wrong. Reflect on what went wrong."
REFLECTION = "I subtracted instead of adding. The sum 12 + 7 is 19."
RETRY = "Try again."


def _install(tmp_path: Path, base_tok, family: str):
    """A copy of ``base_tok`` with ``family``'s template, special tokens and generation config."""
    from transformers import AutoTokenizer

    specials, bos, eos, gen_eos = FAMILIES[family]
    d = tmp_path / family
    base_tok.save_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    if family in SPLIT:
        from tokenizers import Regex, pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT[family]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if family in RSTRIP:  # (added as the family's tokenizer adds them: absorbing the whitespace after)
        from tokenizers import AddedToken

        specials = [AddedToken(t, rstrip=t in RSTRIP[family], special=True, normalized=False) for t in specials]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens(PLAIN_ADDED.get(family, []))
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    tok.save_pretrained(str(d))
    ids = [tok.convert_tokens_to_ids(t) for t in gen_eos]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """Templates that write the day's date (Mistral Small 3.1, Granite 3.3, SmolLM3) render the same
    prompt every day: the tiny models' episodes sample from it, and what they sample (whether a
    turn is ever closed, say) must not change at midnight."""
    import datetime as dt

    from transformers.utils import chat_template_utils

    class Day(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(chat_template_utils, "datetime", Day)


@pytest.fixture(scope="module")
def tokenizers(builtin, tmp_path_factory):
    base = builtin[1]
    root = tmp_path_factory.mktemp("templates")
    toks = {f: _install(root, base, f) for f in FAMILIES}
    toks["smollm2"] = base
    return toks


def _conversation(system: bool):
    msgs = [{"role": "system", "content": "You are good at arithmetic."}] if system else []
    return msgs + [{"role": "user", "content": QUERY}]


def _r3_ids(chat: ChatFormat, family: str, messages, closed: bool, reflect: str = REFLECT,
            retry: str = RETRY) -> list[int]:
    lead = LEAD.get(family, "")

    def said(text):  # what the model generated: its text, and the end-of-turn token unless cut off
        return chat.encode(lead + text) + ([chat.end_of_turn_id] if closed else [])

    return (chat.prompt(messages) + said(ATTEMPT) + chat.user_turn(reflect, closed) + said(REFLECTION)
            + chat.user_turn(retry, closed))


def _template_text(tok, family: str, messages, reflect: str = REFLECT, retry: str = RETRY) -> str:
    full = messages + [{"role": "assistant", "content": ATTEMPT}, {"role": "user", "content": reflect},
                       {"role": "assistant", "content": REFLECTION}, {"role": "user", "content": retry}]
    text = tok.apply_chat_template(full, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if family in ("qwen3", "qwen35"):
        # Qwen3 and 3.5 leave the empty think block of their non-thinking generation prompt out of
        # past assistant turns; the model saw it when it wrote them, and r3 keeps it there.
        header = "<|im_start|>assistant\n"
        parts = text.split(header)
        text = parts[0] + "".join(header + ("" if p.startswith("<think>") else "<think>\n\n</think>\n\n") + p
                                  for p in parts[1:])
    if family == "gemma4":
        # Gemma 4's leaves the empty thought channel of its generation prompt out of past model turns
        header, empty = "<|turn>model\n", "<|channel>thought\n<channel|>"
        parts = text.split(header)
        text = parts[0] + "".join(header + ("" if p.startswith(empty) else empty) + p for p in parts[1:])
    if family == "deepseek_r1_distill":
        # Its generation prompt opens the reasoning block, which past assistant turns leave out.
        text = text.replace("<｜Assistant｜>", "<｜Assistant｜><think>\n").replace("<think>\n<think>\n", "<think>\n")
    return text


CASES = [(f, s) for f in [*FAMILIES, "smollm2"] for s in (False, True) if not (f in ("mistral_v03", "gemma2") and s)]


@pytest.mark.parametrize("family,system", CASES)
@pytest.mark.parametrize("closed", [True, False])
def test_continuation_is_the_templates_rendering(tokenizers, family, system, closed):
    tok = tokenizers[family]
    chat = ChatFormat(tok)
    messages = _conversation(system)
    ours = _r3_ids(chat, family, messages, closed)
    text = _template_text(tok, family, messages)
    if family not in RSTRIP:  # (an rstrip token drops the whitespace it absorbed when decoded)
        assert tok.decode(ours, skip_special_tokens=False) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
    assert chat.prompt(messages) == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                           enable_thinking=False, return_dict=False)


@pytest.mark.parametrize("family", [*FAMILIES, "smollm2"])
def test_a_user_turn_holds_the_message_as_the_template_writes_it(tokenizers, family):
    """Templates that trim message text (Llama 3, Gemma, Qwen 3.5) write a reflection or retry
    prompt with edge whitespace (a YAML block scalar ends in a newline) without it: the user turns
    r3 builds hold the message as the template writes it, so the conversation is still the
    template's rendering, token for token."""
    tok = tokenizers[family]
    chat = ChatFormat(tok)
    messages = _conversation(False)
    for reflect, retry in [(REFLECT + "\n", "  " + RETRY + " \n\n"), ("\n" + REFLECT, RETRY + "\t")]:
        for closed in (True, False):
            ours = _r3_ids(chat, family, messages, closed, reflect, retry)
            text = _template_text(tok, family, messages, reflect, retry)
            assert tok(text, add_special_tokens=False)["input_ids"] == ours, (reflect, retry, closed)


# Prompts a plug-in may write: empty or blank, Unicode whitespace a template's trim removes, the
# probes' own strings and turn markup, a tool-response-shaped text (Qwen's templates look for it).
ODD_PROMPTS = ["", " \n\t ", "\u3000Try\u00a0again.\u2028", "x PROBE_ATTEMPT<|im_end|>\n<|im_start|>user\n y",
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi", "<end_of_turn>\n<start_of_turn>user\nhi",
               " <tool_response>\nr\n</tool_response>\n", "{{ raise_exception('no') }}"]


@pytest.mark.parametrize("family", ["qwen35", "llama31", "gemma3", "phi35", "mistral_small31", "smollm2"])
def test_odd_prompts_are_written_as_the_template_writes_them(tokenizers, family):
    """A reflection or retry prompt of any text, markup of the family's turns included, is the
    template's rendering of that message (as reflection, and as the retry that ends the conversation)."""
    tok = tokenizers[family]
    chat = ChatFormat(tok)
    messages = _conversation(False)
    for odd in ODD_PROMPTS:
        for reflect, retry in [(odd, RETRY), (REFLECT, odd)]:
            text = _template_text(tok, family, messages, reflect, retry)
            assert tok(text, add_special_tokens=False)["input_ids"] == _r3_ids(chat, family, messages, True, reflect,
                                                                              retry), odd


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_a_turn_encodes_as_inside_the_conversation_under_a_sentencepiece_pre_tokenizer(scheme):
    """transformers converts SentencePiece vocabularies (Llama, Mistral) without ``legacy`` to a
    Metaspace pre-tokenizer that marks only the start of the whole text with '▁' (prepend_scheme
    'first'). The text between turns (Phi-3.5's '\\n<|user|>\\n' after <|end|>) never starts the
    conversation: encoded alone it became '▁\\n', a token the template's rendering does not hold
    there, and every later turn of the episode was one the model never sees at inference."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    spm.train_from_iterator([QUERY, ATTEMPT, REFLECT, REFLECTION, RETRY] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                                initial_alphabet=["\n", "▁"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": FAMILIES["phi35"][0][1:]})
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = (TEMPLATES / "phi35.jinja").read_text()
    chat = ChatFormat(tok)
    messages = _conversation(False) + [{"role": "assistant", "content": ATTEMPT}, {"role": "user", "content": REFLECT}]
    whole = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    after_attempt = [k for k, i in enumerate(whole) if i == chat.end_of_turn_id][1]
    assert chat.user_turn(REFLECT) == whole[after_attempt + 1:]
    assert chat.user_turn(REFLECT, closed=False) == whole[after_attempt:]


def test_a_turn_after_an_end_token_that_strips_the_whitespace_after_it_encodes_as_inside_the_conversation(
        builtin, tmp_path):
    """Phi-3's special tokens are added with ``rstrip``: inside the conversation the newline the
    template writes after <|end|> is absorbed by it. A turn encoded without the token in front kept
    that newline as a token of its own, one the template's rendering never holds."""
    from tokenizers import AddedToken

    tok = _with_template(builtin[1], tmp_path, (TEMPLATES / "phi35.jinja").read_text())
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, rstrip=True, special=True, normalized=False)
                                                          for t in ("<|end|>", "<|user|>", "<|assistant|>")]})
    chat = ChatFormat(tok)
    messages = _conversation(False) + [{"role": "assistant", "content": ATTEMPT}, {"role": "user", "content": REFLECT}]
    whole = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    after_attempt = [k for k, i in enumerate(whole) if i == chat.end_of_turn_id][1]
    assert chat.user_turn(REFLECT) == whole[after_attempt + 1:]
    assert chat.user_turn(REFLECT, closed=False) == whole[after_attempt:]


@pytest.mark.parametrize("family", [*FAMILIES, "smollm2"])
def test_stop_ids_are_the_end_of_turn_token_and_the_generation_eos(tokenizers, family):
    tok = tokenizers[family]
    chat = ChatFormat(tok)
    assert chat.end_of_turn_id == tok.convert_tokens_to_ids(END_OF_TURN[family])
    gen = FAMILIES[family][3] if family in FAMILIES else []
    expected = {chat.end_of_turn_id, tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in gen}
    assert set(chat.stop_ids) == expected
    if family == "llama31":  # a list in generation_config.json: all three stop generation
        assert len(chat.stop_ids) == 3
    if family == "phi35":  # eos is <|endoftext|>, the turn ends with <|end|>
        assert tok.convert_tokens_to_ids("<|end|>") in chat.stop_ids
    # a caller's eos ids (r3.generate's --eos-token-id) join them, within the vocabulary only
    extra = ChatFormat(tok, eos_token_ids=[7, -1, len(tok), 10 ** 9])
    assert set(extra.stop_ids) == expected | {7}
    # a turn ends with its end-of-turn token only when that token is its last
    eot = chat.end_of_turn_id
    assert chat.ends_turn([5, eot]) and not chat.ends_turn([eot, 5]) and not chat.ends_turn([])


def test_messages_of_another_shape_are_one_line_not_a_template_traceback(tokenizers):
    """A plug-in's messages() returning a string, a message without its role, or content that is
    not text: one R3Error, where the template raised a transformers TypeError or a jinja
    UndefinedError traceback."""
    chat = ChatFormat(tokenizers["qwen25"])
    for bad in ("What is 2 + 3?", [], [{"content": "hi"}], [{"role": "user", "content": None}], ["hi"]):
        with pytest.raises(R3Error, match=r"^chat messages must be a non-empty list of \{'role': str, 'content': "
                                          r"str\} objects \(what a task's messages\(\) returns\), got "):
            chat.prompt(bad)
    assert chat.prompt([{"role": "user", "content": "hi"}])


def test_qwen3_non_thinking_prompt_and_history(tokenizers):
    chat = ChatFormat(tokenizers["qwen3"])
    text = chat.tok.decode(chat.prompt(_conversation(False)), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.history_drops == "<think>\n\n</think>\n\n"
    thinking = ChatFormat(tokenizers["qwen3"], template_options={})
    assert thinking.history_drops == "" and chat.tok.decode(thinking.prompt(_conversation(False))).endswith(
        "assistant\n")


def test_gemma2_system_message_is_refused_in_one_line(tokenizers):
    """Gemma 2's template raises on a system message: a task with one is a one-line error."""
    chat = ChatFormat(tokenizers["gemma2"])
    with pytest.raises(R3Error, match="does not take a system message.*System role not supported") as e:
        chat.prompt(_conversation(True))
    assert "\n" not in str(e.value)
    assert chat.prompt(_conversation(False))


def test_mistral_v03_system_message_is_refused_in_one_line(tokenizers):
    chat = ChatFormat(tokenizers["mistral_v03"])
    with pytest.raises(R3Error, match="does not keep a system message at the start.*Mistral v0.3") as e:
        chat.prompt(_conversation(True))
    assert "\n" not in str(e.value) and "without a system message" in str(e.value)
    assert chat.prompt(_conversation(False))  # no system message: fine


def _with_template(tok, tmp_path, template: str):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    t = AutoTokenizer.from_pretrained(str(tmp_path))
    t.chat_template = template
    return t


def test_templates_that_cannot_be_continued_are_refused(builtin, tmp_path):
    plain = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(R3Error, match="not with a special token"):
        ChatFormat(_with_template(builtin[1], tmp_path / "a", plain))
    marks_last = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.last %} (latest){% endif %}\n"
                  "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(R3Error, match="re-renders earlier turns"):
        ChatFormat(_with_template(builtin[1], tmp_path / "b", marks_last))
    numbered = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.index > 3 %} again{% endif %}\n"
                "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(R3Error, match="second round"):
        ChatFormat(_with_template(builtin[1], tmp_path / "c", numbered))
    raises = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(R3Error, match="roles must alternate"):
        ChatFormat(_with_template(builtin[1], tmp_path / "d", raises))


def test_a_generation_prompt_that_ends_in_a_space_keeps_it_in_every_turn(builtin, tmp_path):
    """A template whose generation prompt ends in a space ("<|im_start|>assistant: "): the turns
    r3 appends end with it too, as the template renders the conversation, not trimmed."""
    spaced = _CHATML_TURNS.replace("{{ m.role }}\n", "{{ m.role }}: ").replace("assistant\n", "assistant: ")
    tok = _with_template(builtin[1], tmp_path, spaced)
    chat = ChatFormat(tok)
    messages = _conversation(False) + [{"role": "assistant", "content": ATTEMPT}, {"role": "user", "content": REFLECT}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant: ")
    assert tok.decode(chat.user_turn(REFLECT)) == text[text.index(ATTEMPT) + len(ATTEMPT) + len("<|im_end|>"):]


def test_a_template_that_leaves_out_the_first_message_is_refused(builtin, tmp_path):
    """A template written for conversations that open with a system message renders
    ``messages[1:]``: the task's query would vanish from every prompt while the rest of the
    conversation still continues. Refused when the ChatFormat is made, naming what it drops."""
    drops_first = _CHATML_TURNS.replace("{% for m in messages %}", "{% for m in messages[1:] %}")
    with pytest.raises(R3Error, match="drops messages of a plain user / assistant / user conversation"):
        ChatFormat(_with_template(builtin[1], tmp_path, drops_first))


def test_a_template_error_is_named_by_its_first_line(builtin, tmp_path):
    """A template that raises with a message of several lines: the refusal is one line, the
    message's first (where the template says what is wrong)."""
    raises = "{{ raise_exception('roles must alternate user/assistant\\nsee the model card for details') }}"
    with pytest.raises(R3Error, match="cannot apply the tokenizer's chat template") as e:
        ChatFormat(_with_template(builtin[1], tmp_path, raises))
    assert "roles must alternate user/assistant" in str(e.value) and "\n" not in str(e.value)


_CHATML_TURNS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_user_message_the_template_will_not_write_is_kept_as_it_is(builtin, tmp_path):
    """Where rendering the message raises or rewrites the turns around it, the user turn holds the
    text as given (the text between turns stays the probes')."""
    odd = (_CHATML_TURNS.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>{{ 'bot' if 'reframe' in "
                                 "messages[-1].content else 'assistant' }}\n{% endif %}")
           .replace("{{ m.content }}", "{% if 'raise' in m.content %}{{ raise_exception('no') }}{% endif %}"
                    "{{ m.content | trim }}"))
    assert odd.count("reframe") == 1
    chat = ChatFormat(_with_template(builtin[1], tmp_path, odd))
    glue, tail = "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    for text, written in [(" Try again.\n", "Try again."), ("raise it ", "raise it "), (" reframe", " reframe")]:
        assert chat.user_turn(text) == chat.encode(glue + written + tail)[1:]


def test_a_user_message_is_read_from_the_probes_frame(builtin, tmp_path):
    """The message is what the template writes between the probe answer's glue and the tail:
    a text that holds the probe answer and the glue itself is read whole (not from its own copy
    of them), and a text that changes the turn's header (the probe answer's glue is not in the
    rendering) is kept as it is."""
    trims = _CHATML_TURNS.replace("{{ m.content }}", "{{ m.content | trim }}")
    chat = ChatFormat(_with_template(builtin[1], tmp_path / "trim", trims))
    glue, tail = "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    inner = "PROBE_ATTEMPT" + glue + "again"
    assert chat.user_turn(" " + inner + "\n") == chat.encode(glue + inner + tail)[1:]
    loud = trims.replace("<|im_start|>{{ m.role }}\n", "<|im_start|>{{ m.role }}{{ '!' if 'urgent' in m.content "
                         "else '' }}\n")
    assert loud.count("urgent") == 1
    chat = ChatFormat(_with_template(builtin[1], tmp_path / "loud", loud))
    assert chat.user_turn(" urgent: retry\n") == chat.encode(glue + " urgent: retry\n" + tail)[1:]


def test_a_template_that_writes_text_before_past_assistant_turns_is_refused(builtin, tmp_path):
    """Text (not whitespace) the template puts before a past assistant message was never part of
    what the model saw when it sampled that message: r3 cannot reproduce the rendering."""
    prefixed = _CHATML_TURNS.replace("{{ m.content }}",
                                     "{% if m.role == 'assistant' %}Answer: {% endif %}{{ m.content }}")
    with pytest.raises(R3Error, match="the chat template re-renders earlier turns; r3 cannot continue"):
        ChatFormat(_with_template(builtin[1], tmp_path / "a", prefixed))
    assert ChatFormat(_with_template(builtin[1], tmp_path / "b", _CHATML_TURNS))  # (the same without: fine)


def test_a_first_generation_prompt_that_later_turns_render_otherwise_is_refused(builtin, tmp_path):
    """A template whose generation prompt for the first answer holds text it writes nowhere else
    (not before the past answer, not in the next generation prompt) re-renders earlier turns: said
    so, not reported as a second-round mismatch."""
    first_only = _CHATML_TURNS.replace("<|im_start|>assistant\n{% endif %}",
                                       "<|im_start|>assistant\n{% if messages|length == 1 %}First answer:{% endif %}"
                                       "{% endif %}")
    assert first_only != _CHATML_TURNS
    with pytest.raises(R3Error, match="the chat template re-renders earlier turns; r3 cannot continue"):
        ChatFormat(_with_template(builtin[1], tmp_path, first_only))


def test_a_space_before_an_end_of_turn_token_that_absorbs_it_is_refused(builtin, tmp_path):
    """The template writes a space before its end-of-turn token, a special token that swallows the
    whitespace before it (lstrip): the ids start with that token, but the text between turns does
    not start with its text, so cutting the token's text off would leave a wrong turn: refused."""
    from tokenizers import AddedToken

    tok = _with_template(builtin[1], tmp_path, _CHATML_TURNS.replace("{{ m.content }}<|im_end|>",
                                                                     "{{ m.content }} <|eot|>"))
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|eot|>", lstrip=True, special=True)]})
    assert tok(" <|eot|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|eot|>")]
    with pytest.raises(R3Error, match=r"ends an assistant turn with ' <\|eot\|>.*not with a special token"):
        ChatFormat(tok)


def test_a_template_that_drops_the_system_message_refuses_one(builtin, tmp_path):
    """A template that leaves system messages out would silently lose the task's system prompt:
    a prompt with one is refused in one line, a prompt without one is fine."""
    chat = ChatFormat(_with_template(builtin[1], tmp_path, _CHATML_TURNS.replace(
        "{% for m in messages %}", "{% for m in messages if m.role != 'system' %}")))
    with pytest.raises(R3Error, match="does not keep a system message at the start of the conversation"):
        chat.prompt(_conversation(True))
    text = chat.tok.decode(chat.prompt(_conversation(False)))
    assert text == f"<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_whose_turns_change_after_a_system_message_refuses_one(builtin, tmp_path):
    """A template that separates every turn otherwise when the conversation opens with a system
    message: the turns r3 derived without one would continue a conversation with one unlike the
    template (one newline between turns where the template writes two), so a prompt with a system
    message is refused in one line; one without is fine."""
    template = ("{% if messages[0].role == 'system' %}{% set sep = '\\n\\n' %}{% else %}{% set sep = '\\n' %}{% endif %}"
                + _CHATML_TURNS.replace("<|im_end|>\n{% endfor %}", "<|im_end|>{{ sep }}{% endfor %}"))
    tok = _with_template(builtin[1], tmp_path, template)
    with_system = tok.apply_chat_template(_conversation(True) + [{"role": "assistant", "content": ATTEMPT}],
                                          tokenize=False)
    assert f"{ATTEMPT}<|im_end|>\n\n" in with_system  # (the template's turns after a system message)
    chat = ChatFormat(tok)
    assert chat.tok.decode(chat.user_turn(REFLECT)) == f"\n<|im_start|>user\n{REFLECT}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(R3Error, match="renders the turns that follow a system message differently") as e:
        chat.prompt(_conversation(True))
    assert "\n" not in str(e.value)
    assert chat.prompt(_conversation(False))


def test_user_template_options_are_checked_and_kept_by_type():
    """Only a value equal to the default and of its type is dropped. A default that is true or false
    takes only true or false: Qwen3's template tests ``enable_thinking is false``, so 0, "no" or
    "maybe" turned thinking on (they were passed on as given). apply_chat_template's own arguments
    are refused."""
    from r3.chat import user_template_options

    assert user_template_options({"enable_thinking": False, "x": 1}) == {"x": 1}
    for value in (0, "maybe", "no", None):
        with pytest.raises(R3Error, match=f"^--chat-template-option: 'enable_thinking' must be true or false, got {value!r}$"):
            user_template_options({"enable_thinking": value}, "--chat-template-option")
    assert user_template_options({"enable_thinking": True, "x": "maybe"}) == {"enable_thinking": True, "x": "maybe"}
    with pytest.raises(R3Error, match="'tokenize' is an argument r3 gives the chat template itself, not a template"):
        user_template_options({"tokenize": True})
    # every argument r3 gives apply_chat_template itself is named, not passed on to clash with it
    # (add_generation_prompt) or to change every prompt unseen (tools, documents)
    for key in ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                "continue_final_message", "tokenize", "return_dict", "return_assistant_tokens_mask"):
        with pytest.raises(R3Error, match=f"^--chat-template-option: '{key}' is an argument r3 gives"):
            user_template_options({"enable_thinking": True, key: False}, "--chat-template-option")


def test_template_options_with_keys_that_are_not_strings_are_refused():
    """A YAML config's ``chat_template_options: {1: true}`` has an integer key: refused where the
    options are read, not passed on to fail as keyword arguments inside the template."""
    from r3.chat import user_template_options

    with pytest.raises(R3Error, match="chat_template_options must be a mapping with string keys"):
        user_template_options({1: True})
    with pytest.raises(R3Error, match="must be a mapping with string keys"):
        user_template_options({"enable_thinking": True, ("a",): 1})


def test_a_template_that_raises_on_a_system_message_refuses_one_in_one_line(builtin, tmp_path):
    """Gemma's template raises 'System role not supported': conversations without a system
    message work, and a prompt with one is refused with the template's reason (not the template's
    exception from deep inside the first prompt of a run)."""
    template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                + _CHATML_TURNS)
    chat = ChatFormat(_with_template(builtin[1], tmp_path, template))
    assert chat.prompt(_conversation(False))
    with pytest.raises(R3Error, match=r"does not take a system message \(System role not supported\)"):
        chat.prompt(_conversation(True))


def test_a_tokenizer_that_adds_bos_to_every_text_adds_none_inside_a_conversation(tokenizers):
    """Llama 3's own tokenizer adds <|begin_of_text|> to each text it encodes (its post-processor;
    these copies lack it) while the template writes it at the start of the conversation: r3 encodes
    the rendered text as it is, so the conversation holds one, at its start, and no turn adds one."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizers["llama31"])
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("12 - 7")["input_ids"][0] == bos  # (the tokenizer adds it now)
    chat = ChatFormat(tok)
    messages = _conversation(True)
    ours = _r3_ids(chat, "llama31", messages, closed=True)
    assert ours == tok(_template_text(tok, "llama31", messages), add_special_tokens=False)["input_ids"]
    assert ours[0] == bos and ours.count(bos) == 1


def test_a_bad_generation_config_is_named(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tokenizers["llama31"].save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "<|eot_id|>"}')
    with pytest.raises(R3Error, match="generation_config.json: eos_token_id must be an integer"):
        ChatFormat(AutoTokenizer.from_pretrained(str(tmp_path)))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, ')
    with pytest.raises(R3Error, match="generation_config.json: cannot read"):
        ChatFormat(AutoTokenizer.from_pretrained(str(tmp_path)))


@pytest.mark.parametrize("family,kind,eos_logit", [("phi35", "phi3", 9.0), ("qwen3", "qwen3", 10.0),
                                                   ("qwen35", "qwen35", 35.0),
                                                   ("llama31", "llama", 9.0), ("gemma3", "gemma3", 4.0),
                                                   ("gemma2", "gemma2", 4.0), ("gemma4", "gemma4", 2.0),
                                                   ("smollm3", "smollm3", 9.0), ("olmo2", "olmo2", 4.0),
                                                   ("olmo31", "olmo3", 4.0), ("mistral_small31", "ministral3", 9.0),
                                                   ("granite33", "granite", 13.0)])
def test_episode_on_a_tiny_model_with_the_family_template(tokenizers, tmp_path, family, kind, eos_logit):
    """A whole Reflect-Retry episode on a tiny random model of the family, its tokenizer carrying
    the real template: every sequence is the prompt, the attempt, the reflection turn, the
    reflection, the retry turn and the retry, ids exactly as ChatFormat builds them; the
    end-of-turn token closes turns; without trimming templates (Phi-3.5, Qwen3) the text equals
    the template's rendering of the conversation (Qwen3 with its think blocks, as sampled).
    Qwen 3.5's model is a tiny one of its own architecture (Gated DeltaNet layers)."""
    from test_episode import CoinTask, build_tiny_chat_model

    from r3.checkpoint import load
    from r3.episode import EpisodeSampling, run_episode

    tok = tokenizers[family]
    eot = ChatFormat(tok).end_of_turn_id
    extra = {"original_max_position_embeddings": 1024} if kind == "phi3" else {}
    if kind in ("gemma2", "gemma4"):  # (Gemma 2's own logit cap, 30: the tiny kind's 4 would cap the end-of-turn logit)
        extra = {"final_logit_softcapping": 30.0}
    if kind == "gemma4":  # (no per-layer inputs: they would feed the dimension that sets the end-of-turn logit)
        extra["hidden_size_per_layer_input"] = 0
    build_tiny_chat_model(tmp_path, tok, eos_logit=eos_logit, kind=kind, eos=eot, **extra)
    gen = [tok.convert_tokens_to_ids(t) for t in FAMILIES[family][3]]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen}))
    model, tok = load(str(tmp_path))
    chat = ChatFormat(tok)
    assert set(gen) <= set(chat.stop_ids) and eot in chat.stop_ids
    task = CoinTask()
    examples = task.examples(n=10)
    sampling = EpisodeSampling(temperature=1.0, max_attempt_tokens=6, max_reflection_tokens=5, max_retry_tokens=5)
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=sampling, seed=5, chat=chat)
    assert ep.sequences
    closed_turns = compared = 0
    for r, seq in enumerate(ep.sequences):
        g = r // 2
        ex = ep.group_examples[g]
        attempt = list(ep.attempts[g])
        (s, e), (rs, re_) = ep.spans[r], ep.retry_spans[r]
        refl, retry = seq[s:e], seq[rs:re_]
        shut = [chat.ends_turn(t) for t in (attempt, refl)]
        closed_turns += sum(shut)
        built = (chat.prompt(task.messages(ex)) + attempt + chat.user_turn(task.reflection_prompt, shut[0]) + refl
                 + chat.user_turn(task.retry_prompt, shut[1]) + retry)
        assert built == seq
        if family in TRIMS:
            continue  # their templates trim message text; random tokens have edge whitespace

        def content(ids):
            return tok.decode(ids[:-1] if ids and ids[-1] in chat.stop_ids else ids, skip_special_tokens=False)

        messages = task.messages(ex) + [
            {"role": "assistant", "content": content(attempt)}, {"role": "user", "content": task.reflection_prompt},
            {"role": "assistant", "content": content(refl)}, {"role": "user", "content": task.retry_prompt}]
        if any("<think>" in m["content"] or "</think>" in m["content"] for m in messages):
            continue
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        if family in ("qwen3", "qwen35"):
            text = text.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n")
            text = text.replace("<think>\n\n</think>\n\n<think>\n\n</think>\n\n", "<think>\n\n</think>\n\n")
        got = tok.decode(seq, skip_special_tokens=False)
        want = text + tok.decode(retry, skip_special_tokens=False)
        if family in RSTRIP:  # (an rstrip token drops the whitespace after it when decoded: compare without)
            after = re.compile("(" + "|".join(map(re.escape, RSTRIP[family])) + r")\s+")
            got, want = after.sub(r"\1", got), after.sub(r"\1", want)
        assert got == want
        compared += 1
    assert compared > 0 or family in TRIMS
    assert closed_turns > 0  # both the closed and the cut-off path are exercised
    assert closed_turns < 2 * len(ep.sequences)

    # A turn stopped by another stop id (the tokenizer's eos here, or a generation-config id)
    # is closed with the end-of-turn token after it, as the template closes every turn.
    # (SmolLM3's template and tokenizer stop at <|im_end|> alone)
    said = chat.encode("Item 1 is fine.")
    attempts = [said + [i] for i in chat.stop_ids if i != eot][:1] + [said + [eot], said]
    ep = run_episode(model, tok, task, examples[:len(attempts)], group_size=2, sampling=sampling, seed=5, chat=chat,
                     failed_attempts=attempts)
    for g, a in enumerate(attempts):
        seq = ep.sequences[2 * g]
        start = len(chat.prompt(task.messages(examples[g])))
        turn = chat.user_turn(task.reflection_prompt, closed=a[-1] == eot)
        assert seq[start:start + len(a) + len(turn)] == a + turn
        assert (seq[start + len(a)] == eot) == (a[-1] != eot)

    # The export keeps the base checkpoint's generation eos list, so it stops where the base did.
    from r3.checkpoint import save_hf

    save_hf(model, tok, tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"]
    assert saved == (gen if len(gen) > 1 else gen[0])
    _, tok2 = load(str(tmp_path / "export"))
    assert ChatFormat(tok2).stop_ids == chat.stop_ids


def test_generation_eos_falls_back_to_config_json(tokenizers, tmp_path):
    """A generation_config.json without eos_token_id defers to config.json, as transformers does."""
    from transformers import AutoTokenizer

    from r3.checkpoint import generation_eos_ids

    tokenizers["qwen25"].save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1}')
    (tmp_path / "config.json").write_text('{"eos_token_id": [0, 2]}')
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert generation_eos_ids(tok) == [0, 2]
    assert {0, 2} <= set(ChatFormat(tok).stop_ids)
    (tmp_path / "config.json").unlink()
    assert generation_eos_ids(AutoTokenizer.from_pretrained(str(tmp_path))) == []


def test_generation_config_eos_comes_before_config_json(tokenizers, tmp_path):
    """Where both name eos ids (Qwen2.5-Instruct: config.json <|im_end|> alone, generation_config.json
    it and <|endoftext|>), generate stops at generation_config.json's: so do r3's stop ids."""
    from transformers import AutoTokenizer

    from r3.checkpoint import generation_eos_ids

    tokenizers["qwen25"].save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    (tmp_path / "config.json").write_text('{"eos_token_id": 5}')
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert generation_eos_ids(tok) == [0, 2]
    assert 5 not in ChatFormat(tok).stop_ids


def test_the_end_of_turn_token_stops_where_neither_eos_nor_a_generation_config_names_it(tokenizers, tmp_path):
    """A base model's tokenizer (Qwen2.5 base: eos ``<|endoftext|>``, the ChatML template, no
    generation config): the template's end-of-turn token ``<|im_end|>`` is a stop id all the same,
    or every closed turn would run on to its token limit."""
    from transformers import AutoTokenizer

    tokenizers["qwen25"].save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.eos_token = "<|endoftext|>"
    chat = ChatFormat(tok)
    im_end, text_end = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert im_end != text_end and chat.end_of_turn_id == im_end
    assert chat.stop_ids == sorted({im_end, text_end})


def test_a_generation_prompt_that_opens_the_reasoning_block(tokenizers):
    """DeepSeek-R1-Distill's generation prompt ends in ``<think>\\n``: the reply continues the
    reasoning block, so the text r3 verifies (``decode``) starts with that opening. Templates
    whose prompt closes the block (Qwen3 non-thinking) or leaves it to the model add nothing."""
    from r3.tasks.function_calling import FunctionCallingTask

    chat = ChatFormat(tokenizers["deepseek_r1_distill"])
    assert chat.tok.decode(chat.prompt(_conversation(True))).endswith("<｜Assistant｜><think>\n")
    assert chat.reply_prefix == "<think>\n" and chat.history_drops == "<think>\n"
    for family in ("qwen3", "qwen35", "qwen25", "llama31", "smollm2"):
        assert ChatFormat(tokenizers[family]).reply_prefix == ""
    assert ChatFormat(tokenizers["qwen3"], template_options={}).reply_prefix == ""
    # Qwen3.5-0.8B's template thinks when told to: its generation prompt then opens the block, as
    # R1's does; by default it closes it, as r3's default options ask.
    for options in (None, {}):
        qwen35 = ChatFormat(tokenizers["qwen35"], template_options=options)
        assert qwen35.reply_prefix == "" and qwen35.history_drops == "<think>\n\n</think>\n\n"
    qwen35 = ChatFormat(tokenizers["qwen35"], template_options={"enable_thinking": True})
    assert qwen35.reply_prefix == "<think>\n" and qwen35.history_drops == "<think>\n"

    # Reasoning tags a tokenizer marks special (this Qwen3 copy does) stay in the decoded reply;
    # other special tokens do not.
    qwen3 = ChatFormat(tokenizers["qwen3"], template_options={})
    said = qwen3.encode("<think>\nx\n</think>\n\n5 + 23") + [qwen3.end_of_turn_id]
    assert qwen3.tok.convert_tokens_to_ids("</think>") in qwen3.tok.all_special_ids
    assert qwen3.decode(said) == "<think>\nx\n</think>\n\n5 + 23"
    assert qwen3.decode(qwen3.encode("5 + 23") + [qwen3.end_of_turn_id]) == "5 + 23"

    task = FunctionCallingTask()
    tools = [{"name": "get_weather", "description": "Weather of a city.",
              "parameters": {"city": {"type": "str", "description": "The city."}}},
             {"name": "delete_all", "description": "Delete every file.", "parameters": {}}]
    ex = {"id": 1, "query": "Weather in Paris?", "tools": tools,
          "answers": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = 'The user wants the weather; get_weather(city="Paris") it is, not delete_all().\n</think>\n\n' + good
    ids = chat.encode(reply) + [chat.end_of_turn_id]
    assert chat.decode(ids) == "<think>\n" + reply
    assert task.verify(ex, chat.decode(ids))
    assert not task.verify(ex, reply)  # read from inside the block, its mentions are call attempts
    # An answer only inside the reasoning (cut off before </think>) is no answer.
    assert not task.verify(ex, chat.decode(chat.encode("I will answer with " + good)))
    assert not task.verify(ex, chat.decode(chat.encode('Plan: delete_all()\n</think>\n' + good.replace("Paris", "Rome"))))

    # Countdown's "</answer>" ends an answer turn only after the reasoning block closes: one
    # written inside the reasoning does not cut it off before its answer.
    from r3.episode import answer_stops
    from r3.tasks.countdown import CountdownTask

    def stop_at(stops, fmt, text):
        """The decoded reply up to the token a sampler stops at (None: it runs on)."""
        ids = fmt.encode(text)
        k = next((k for k in range(1, len(ids) + 1) if stops.completed(ids[:k])), None)
        return None if k is None else fmt.decode(ids[:k])

    tagged = CountdownTask(answer_tags=True)
    stops = answer_stops(tagged, chat)
    assert stops is not None and stops.strings == ("</answer>",)
    got = stop_at(stops, chat, "Maybe <answer>5 + 3</answer>? No.\n</think>\n\n<answer>5 + 23</answer> trailing")
    assert got is not None and got.count("</answer>") == 2 and "trailing" not in got
    assert stop_at(stops, chat, "Maybe <answer>5 + 3</answer>, cut off") is None  # never closed: no stop
    qwen = ChatFormat(tokenizers["qwen25"])
    stops = answer_stops(tagged, qwen)
    assert stop_at(stops, qwen, "x = 1 + 5 </answer> more") == "x = 1 + 5 </answer>"
    # A reply that opens the block itself (a thinking model's) is read the same way.
    got = stop_at(stops, qwen, "<think>Try <answer>1</answer></think><answer>5 + 23</answer> more")
    assert got is not None and got.endswith("<answer>5 + 23</answer>")
    assert stop_at(stops, qwen, "</think> x </answer>") == "</think> x </answer>"  # (no opening: text)


def test_reasoning_tags_marked_special_only_as_added_tokens_are_kept(tokenizers, tmp_path):
    """Tags flagged special in ``added_tokens_decoder`` but not among the named special tokens are
    kept too, and every other special token (one the reply stopped on, say) is still dropped."""
    tok = _with_template(tokenizers["qwen25"], tmp_path, tokenizers["qwen25"].chat_template)
    tok.add_tokens(["<think>", "</think>", "<|eot_x|>"], special_tokens=True)
    think, eot_x = tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<|eot_x|>")
    assert think not in tok.all_special_ids and tok.added_tokens_decoder[think].special
    chat = ChatFormat(tok)
    said = chat.encode("<think>\nThe answer is not 11 - 3\n</think>\n\n3 + 11") + [eot_x, chat.end_of_turn_id]
    assert chat.decode(said) == "<think>\nThe answer is not 11 - 3\n</think>\n\n3 + 11"
    assert chat.decode(chat.encode("3 + 11") + [eot_x]) == "3 + 11"


def test_gemma4_s_thought_channel_is_read_as_a_reasoning_block(tokenizers):
    """Gemma 4's thinking mode (enable_thinking: ``<|think|>`` in the system turn, no empty channel
    in the generation prompt) has the model write ``<|channel>thought ... <channel|>`` before its
    answer: the reply's text spells it ``<think> ... </think>``, so a verifier reads only the answer
    after it (a right equation left in the thoughts of a reply that never answers is not paid) and
    a stop string inside it does not cut the reply. Without thinking the channel is closed by the
    generation prompt, before the reply."""
    from r3.episode import answer_stops
    from r3.tasks import get

    tok = tokenizers["gemma4"]
    chat = ChatFormat(tok)
    assert chat.prompt_text([{"role": "user", "content": "Hi"}]).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    thinking = ChatFormat(tok, template_options={"enable_thinking": True})
    assert thinking.prompt_text([{"role": "user", "content": "Hi"}]).endswith("<|turn>model\n")
    assert thinking.reply_prefix == "" and "<|think|>" in thinking.prompt_text([{"role": "user", "content": "Hi"}])
    channel = tok.convert_tokens_to_ids("<|channel>")
    said = thinking.encode("<|channel>thought\n25 * 4 - 3 = 97 works<channel|>I give up.") + [thinking.end_of_turn_id]
    assert channel in said
    text = thinking.decode(said)
    assert text == "<think>thought\n25 * 4 - 3 = 97 works</think>I give up."
    task = get("countdown", answer_tags=False)
    ex = {"nums": [25, 4, 3], "target": 97}
    assert not task.verify(ex, text)
    assert task.verify(ex, thinking.decode(thinking.encode("<|channel>thought\nno<channel|>25 * 4 - 3 = 97")))
    tagged = get("countdown")
    stops = answer_stops(tagged, thinking)
    inside = thinking.encode("<|channel>thought\n<answer>1 + 2</answer>")
    assert stops is not None and not stops.confirm(inside)


def test_a_reply_with_special_reasoning_tags_starts_with_the_opened_block(builtin, tmp_path):
    """A generation prompt that opens the reasoning block, and a tokenizer that marks the tags
    special: the decoded reply keeps its ``</think>`` and still starts with the opening the
    prompt wrote (without it a verifier reads the reasoning as the answer)."""
    template = _CHATML_TURNS.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    tok = _with_template(builtin[1], tmp_path, template)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    chat = ChatFormat(tok)
    assert chat.reply_prefix == "<think>\n" and chat.history_drops == "<think>\n"
    said = chat.encode("12 - 7 is 5, not 19\n</think>\n\n12 + 7") + [chat.end_of_turn_id]
    assert tok.convert_tokens_to_ids("</think>") in said
    assert chat.decode(said) == "<think>\n12 - 7 is 5, not 19\n</think>\n\n12 + 7"
    assert chat.decode(chat.encode("12 + 7")) == "<think>\n12 + 7"


def test_reasoning_tags_named_special_but_not_flagged_are_kept(tmp_path):
    """Tags listed among a tokenizer's named special tokens but not flagged special in
    ``added_tokens_decoder`` (as ByT5 lists its own ``<pad>``) are dropped by a Python tokenizer's
    ``skip_special_tokens``, so decode keeps them too."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    tok = ByT5Tokenizer(extra_ids=0)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (TEMPLATES / "qwen25.jinja").read_text()
    tok.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # (transformers 5 lists them in extra_special_tokens; 4.x in additional_special_tokens, beside
    # an extra_special_tokens dict of named ones)
    named = ("extra_special_tokens" if isinstance(config.get("extra_special_tokens"), list)
             else "additional_special_tokens")
    config[named] += ["<think>", "</think>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    think = tok.convert_tokens_to_ids("</think>")
    assert think in tok.all_special_ids and not tok.added_tokens_decoder[think].special
    chat = ChatFormat(tok)
    said = chat.encode("<think>\nThe answer is not 11 - 3\n</think>\n\n3 + 11") + [chat.end_of_turn_id]
    assert tok.decode(said, skip_special_tokens=True) == "\nThe answer is not 11 - 3\n\n\n3 + 11"
    assert chat.decode(said) == "<think>\nThe answer is not 11 - 3\n</think>\n\n3 + 11"


def test_episode_verifies_replies_with_the_opened_reasoning_block(tokenizers, tmp_path):
    """Every text an R1-style episode verifies and records starts inside the opened block."""
    from test_episode import CoinTask, build_tiny_chat_model

    from r3.checkpoint import load
    from r3.episode import EpisodeSampling, run_episode

    tok = tokenizers["deepseek_r1_distill"]
    eot = ChatFormat(tok).end_of_turn_id
    build_tiny_chat_model(tmp_path, tok, eos_logit=9.0, kind="qwen2", eos=eot)
    model, tok = load(str(tmp_path))
    chat = ChatFormat(tok)
    seen = []

    class Recording(CoinTask):
        def _check(self, example, completion_text):
            seen.append(completion_text)
            return super()._check(example, completion_text)

    task = Recording()
    sampling = EpisodeSampling(temperature=1.0, max_attempt_tokens=6, max_reflection_tokens=5, max_retry_tokens=5)
    ep = run_episode(model, tok, task, task.examples(n=6), group_size=2, sampling=sampling, seed=3, chat=chat)
    assert len(seen) >= 6 and all(t.startswith("<think>\n") for t in seen)
    assert ep.records and all(rec[k].startswith("<think>\n") for rec in ep.records
                              for k in ("attempt", "reflection", "retry"))

    # A training run says so when it starts, with the turn budgets that must fit the reasoning.
    from test_train import BASE, run_train

    proc = run_train(BASE + ["--model", str(tmp_path), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert "opens a reasoning block ('<think>')" in proc.stdout and "6 (attempt) / 6 (retry)" in proc.stdout
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["retry"].startswith("<think>\n") for s in samples)


def test_qwen3_thinking_mode_through_the_chat_template_option(tokenizers, tmp_path, monkeypatch):
    """``--chat-template-option enable_thinking=true`` renders Qwen3's thinking mode: the prompt
    leaves the reasoning block to the model. A training run records the option and resumes only
    with it; ``r3.evaluate --run`` renders the run's conversations with it."""
    from test_episode import build_tiny_chat_model
    from test_train import BASE, run_train

    import r3.evaluate
    from r3.chat import template_options

    tok = tokenizers["qwen3"]
    assert template_options() == {"enable_thinking": False} == ChatFormat(tok).template_options
    thinking = ChatFormat(tok, template_options=template_options({"enable_thinking": True}))
    assert tok.decode(thinking.prompt(_conversation(False))).endswith("<|im_start|>assistant\n")
    assert thinking.reply_prefix == "" and thinking.history_drops == ""

    build_tiny_chat_model(tmp_path, tok, eos_logit=10.0, kind="qwen3", eos=thinking.end_of_turn_id)
    run = tmp_path / "run"
    args = BASE + ["--model", str(tmp_path), "--out", str(run)]
    proc = run_train(args + ["--max-steps", "1", "--chat-template-option", "enable_thinking=true"])
    assert "note: enable_thinking is on: the model may open a reasoning block" in proc.stdout
    assert json.loads((run / "config.json").read_text())["chat_template_options"] == {"enable_thinking": True}
    proc = run_train(args + ["--max-steps", "2"], check=False)  # (the default options: another conversation)
    assert proc.returncode == 2 and "chat_template_options" in proc.stderr and "Traceback" not in proc.stderr

    made = []

    class Spy(ChatFormat):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.template_options)

    monkeypatch.setattr(r3.evaluate, "ChatFormat", Spy)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))  # (the run's plug-in task)
    out = tmp_path / "eval.json"
    assert r3.evaluate.main(["--run", str(run), "--n", "2", "--out", str(out), "--quiet"]) == 0
    assert made == [{"enable_thinking": True}] * 4  # the base model and the export: checked first, then run
    doc = json.loads(out.read_text())
    assert doc["settings"]["chat_template_options"] == {"enable_thinking": True}
    from r3.partial_results import model_files  # (what r3.report knows the run by once it is moved)
    assert doc["export_files"] == model_files(str(run / "export"))["files"] and "config.json" in doc["export_files"]
    proc = subprocess.run([sys.executable, "-m", "r3.evaluate", "--run", str(run), "--out", str(out),
                           "--chat-template-option", "enable_thinking=false"], capture_output=True, text=True)
    assert proc.returncode == 2 and "drop --chat-template-option" in proc.stderr

    # r3.forgetting --run --chat renders its prompts with the run's options too (both models).
    import r3.forgetting

    made.clear()
    monkeypatch.setattr(r3.forgetting, "ChatFormat", Spy)
    gs = tmp_path / "gs.jsonl"
    gs.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    bench = ["--data", f"gsm8k={gs}", "--shots", "0", "--max-gen-toks", "3", "--quiet"]
    assert r3.forgetting.main(["--run", str(run), "--chat", *bench, "--out", str(out)]) == 0
    assert made == [{"enable_thinking": True}] * 2
    settings = json.loads(out.read_text())["settings"]
    assert settings["chat_template_options"] == {"enable_thinking": True}
    assert settings["dtype"] == "float32"  # the run's --dtype (auto would be bf16 on a CPU with AMX)
    with pytest.raises(SystemExit) as e:
        r3.forgetting.main(["--run", str(run), "--chat", "--chat-template-option", "enable_thinking=false", *bench,
                            "--out", str(out)])
    assert e.value.code == 2


def test_tool_call_markup_marked_special_is_kept_in_the_reply_s_text(builtin, tmp_path):
    """Llama 3's ``<|python_tag|>`` is a special token that starts code for its interpreter, and
    Mistral's ``[TOOL_CALLS]`` one that starts its calls. Decoding without special tokens gave the
    verifier ``[right calls]exec(...)`` for a reply that asks the harness to run that code after
    the calls, and both verifiers paid it; with the token kept, the extra code is another call.
    A tag right before the calls stays part of the answer."""
    from r3.tasks.function_calling import FunctionCallingTask
    from r3.tasks.recheck import recheck

    tok = _with_template(builtin[1], tmp_path, _CHATML_TURNS)
    tok.add_tokens(["<|python_tag|>", "[TOOL_CALLS]", "<|eot_x|>"], special_tokens=True)
    tag, eot_x = tok.convert_tokens_to_ids("<|python_tag|>"), tok.convert_tokens_to_ids("<|eot_x|>")
    chat = ChatFormat(tok)
    task = FunctionCallingTask()
    example = task.examples("train", n=1)[0]
    right = json.dumps(task.reference_calls(example))
    code = chat.decode(chat.encode(right) + [tag] + chat.encode("exec(chr(105))") + [eot_x])
    assert code == right + "<|python_tag|>exec(chr(105))"
    assert not task.verify(example, code) and not recheck(task, example, code)[0]
    lead = chat.decode([tag] + chat.encode(right) + [chat.end_of_turn_id])
    assert lead == "<|python_tag|>" + right
    assert task.verify(example, lead) and recheck(task, example, lead)[0]
    calls = chat.decode(chat.encode("[TOOL_CALLS]" + right))
    assert calls == "[TOOL_CALLS]" + right and task.verify(example, calls)
