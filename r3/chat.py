"""Conversations as token ids under a model's chat template: the first prompt, the turns that
follow a sampled assistant message, and the stop ids, all derived from the template by rendering
probe conversations. Training, evaluation, failure mining, forgetting (``--chat``) and
``r3.generate`` build every conversation through :class:`ChatFormat`."""

from __future__ import annotations

import reprlib

from r3.checkpoint import generation_eos_ids
from r3.errors import R3Error

DEFAULT_TEMPLATE_OPTIONS = {"enable_thinking": False}  # Qwen3's non-thinking mode; other templates ignore it


# apply_chat_template's own arguments: r3 sets them, a template option may not.
_RESERVED = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
             "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
             "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def user_template_options(options: dict | None, where: str = "chat_template_options") -> dict:
    """A user's chat template options, checked (string keys, none of ``apply_chat_template``'s own
    arguments) and without the keys that equal :data:`DEFAULT_TEMPLATE_OPTIONS`, so that two
    spellings of the same rendering record and compare the same."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise R3Error(f"{where} must be a mapping with string keys, got {options!r}")
    reserved = [k for k in options if k in _RESERVED]
    if reserved:
        raise R3Error(f"{where}: {reserved[0]!r} is an argument r3 gives the chat template itself, not a template option")
    for k, v in options.items():  # (a string is truthy in a template: enable_thinking=maybe turned thinking on)
        if isinstance(DEFAULT_TEMPLATE_OPTIONS.get(k), bool) and not isinstance(v, bool):
            raise R3Error(f"{where}: {k!r} must be true or false, got {v!r}")
    return {k: v for k, v in options.items() if k not in DEFAULT_TEMPLATE_OPTIONS or DEFAULT_TEMPLATE_OPTIONS[k] != v
            or type(DEFAULT_TEMPLATE_OPTIONS[k]) is not type(v)}


def check_messages(messages) -> None:
    """Chat messages as a task's ``messages()`` must return them (a plug-in's other shapes were a
    template error or a traceback)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise R3Error(f"chat messages must be a non-empty list of {{'role': str, 'content': str}} objects (what a "
                      f"task's messages() returns), got {reprlib.repr(messages)}")


def template_options(user: dict | None = None) -> dict:
    """The options r3 renders a chat template with: ``user``'s (``--chat-template-option``) over
    :data:`DEFAULT_TEMPLATE_OPTIONS`."""
    return {**DEFAULT_TEMPLATE_OPTIONS, **user_template_options(user or {})}


_PROBE_SYSTEM, _PROBE_Q, _PROBE_A, _PROBE_U, _PROBE_R, _PROBE_V = (
    "PROBE_SYSTEM", "PROBE_QUERY", "PROBE_ATTEMPT", "PROBE_USER", "PROBE_REFLECTION", "PROBE_RETRY")


class ChatFormat:
    """Token ids of a conversation under the tokenizer's chat template.

    ``prompt(messages)`` renders the first turn with the generation prompt. ``user_turn(text,
    closed)`` is what follows an assistant message the model produced: the end-of-turn token if
    the model did not emit one (it hit its token limit), the template's text between turns, the
    user message as the template writes it (trimmed, by Llama 3's, Gemma's and Qwen 3.5's) and the
    next assistant header. All of it is derived from the template by
    rendering probe conversations, never guessed from token names:

    - the end-of-turn token is the special token the template puts right after an assistant
      message (``<|im_end|>``, ``<|eot_id|>``, Phi-3's ``<|end|>``, Mistral's ``</s>``);
    - ``stop_ids`` are that token, the tokenizer's eos and every ``eos_token_id`` of the
      checkpoint's ``generation_config.json`` (``config.json`` when there is none), as
      transformers' ``generate`` would stop;
    - a template may add text only when ``add_generation_prompt`` is false (Phi-3.5 appends
      eos): only renderings with the generation prompt are used;
    - a template may render earlier assistant turns without part of its generation prompt (Qwen3
      drops the empty ``<think></think>`` block of past turns): r3 keeps the conversation as the
      model saw it when sampling, so the sequence differs from a re-rendering by exactly that
      text in each past assistant turn (``history_drops``);
    - a template that moves the system message to the last user turn (Mistral v0.3) cannot be
      continued with a system message: ``prompt`` says so in one line;
    - a generation prompt may open the assistant's reasoning block (DeepSeek-R1-Distill's ends in
      ``<think>\n``): the model's reply then continues that block, so ``reply_prefix`` holds the
      opening and ``decode`` puts it in front of the reply's text. Verifiers read the reply as the
      assistant message it completes, reasoning block included, not as a fragment that starts
      inside it.

    ``template_options`` are passed to the template (default :data:`DEFAULT_TEMPLATE_OPTIONS`,
    ``enable_thinking=False``: Qwen3's non-thinking mode; templates that do not use it ignore it;
    :func:`template_options` merges a user's over it). ``eos_token_ids`` adds stop ids.
    """

    def __init__(self, tokenizer, *, eos_token_ids=None, template_options: dict | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise R3Error("the tokenizer has no chat template (r3 needs one to build conversations)")
        self.tok = tokenizer
        self.template_options = dict(DEFAULT_TEMPLATE_OPTIONS if template_options is None else template_options)
        if tokenizer.eos_token_id is None:
            raise R3Error("the tokenizer has no end-of-sequence token")
        q, a, u = ({"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A},
                   {"role": "user", "content": _PROBE_U})
        one = self._probe([q])
        two = self._probe([q, a, u])
        shape = _continuation(one, two)
        if isinstance(shape, str):
            raise R3Error(f"the chat template {shape}; r3 cannot continue conversations with it")
        self._shape = shape
        self.history_drops, lead, glue, self._tail = shape
        self.end_of_turn_id = self._end_of_turn(glue)
        self._glue = glue  # from the end of a turn to the next user text: "<|im_end|>\n<|im_start|>user\n"
        self._user_texts: dict[str, str] = {}
        # A second round must render like the first (earlier turns as the template renders them).
        three = self._probe([q, a, u, {"role": "assistant", "content": _PROBE_R},
                             {"role": "user", "content": _PROBE_V}])
        past_tail = self._tail[:len(self._tail) - len(self.history_drops)]
        head = two[:two.index(_PROBE_A)]
        expected = head + _PROBE_A + glue + _PROBE_U + past_tail + lead + _PROBE_R + glue + _PROBE_V + self._tail
        if three != expected:
            raise R3Error("the chat template renders a second round of turns differently from the first; "
                          "r3 cannot continue conversations with it")
        self._system_problem = self._check_system(q, a, u)
        opened = self._tail.rfind("<think>")
        self.reply_prefix = self._tail[opened:] if opened > self._tail.rfind("</think>") else ""
        # Reasoning tags that a tokenizer marks special would vanish from the decoded reply; they
        # delimit what verifiers read, so decode keeps them.
        self._kept = _kept_special_tokens(tokenizer)
        extra = set() if eos_token_ids is None else {int(i) for i in eos_token_ids}
        ids = {self.end_of_turn_id, int(tokenizer.eos_token_id)} | extra | set(generation_eos_ids(tokenizer))
        self.stop_ids = sorted(i for i in ids if 0 <= i < len(tokenizer))

    def _probe(self, messages) -> str:
        try:
            return self._render(messages, generation=True)
        except Exception as e:  # a template that raises on a plain user/assistant conversation
            raise R3Error(f"cannot apply the tokenizer's chat template ({_first_line(e)})") from None

    def _end_of_turn(self, glue: str) -> int:
        ids = self.encode(glue)
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        token = added.get(ids[0]) if ids else None
        text = getattr(token, "content", str(token)) if token is not None else None
        if text is None or not glue.startswith(text):
            raise R3Error(f"the chat template ends an assistant turn with {glue[:40]!r}, not with a special "
                          "token; r3 needs an end-of-turn token to stop generating at")
        return ids[0]

    def _check_system(self, q, a, u) -> str | None:
        s = {"role": "system", "content": _PROBE_SYSTEM}
        try:
            one = self._render([s, q], generation=True)
            two = self._render([s, q, a, u], generation=True)
        except Exception as e:
            return f"the chat template does not take a system message ({_first_line(e)})"
        shape = _continuation(one, two)
        if isinstance(shape, str) or _PROBE_SYSTEM not in two[:two.index(_PROBE_A)]:
            return ("the chat template does not keep a system message at the start of the conversation (Mistral "
                    "v0.3's moves it to the last user turn; some drop it), so a conversation with one cannot be "
                    "continued exactly; use the task without a system message")
        if shape != self._shape:
            return ("the chat template renders the turns that follow a system message differently from those "
                    "of a conversation without one, so a conversation with one cannot be continued exactly; use "
                    "the task without a system message")
        return None

    def _render(self, messages, generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                            **self.template_options)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, messages: list[dict]) -> str:
        """The first turn(s) with the generation prompt, as text."""
        check_messages(messages)
        if self._system_problem and any(m.get("role") == "system" for m in messages):
            raise R3Error(self._system_problem)
        return self._render(messages, generation=True)

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.prompt_text(messages))

    def ends_turn(self, ids) -> bool:
        """Whether a generated turn ends with the end-of-turn token. A turn cut off by the token
        limit, or stopped by another stop id (Qwen's ``<|endoftext|>``, Llama's ``<|eom_id|>``),
        does not: ``user_turn(..., closed=False)`` then writes the end-of-turn token after it, so
        every assistant turn is closed as the template closes it."""
        return bool(ids) and ids[-1] == self.end_of_turn_id

    def user_turn(self, text: str, closed: bool = True) -> list[int]:
        # Encoded after the end-of-turn token, as the turn stands in the conversation: encoded
        # alone, its first text would keep the whitespace an rstrip end token absorbs (Phi-3's
        # <|end|>\n) or get the '▁' a SentencePiece pre-tokenizer puts at a text's start only.
        ids = self.encode(self._glue + self._user_text(text) + self._tail)
        return ids[1:] if closed else ids

    def _user_text(self, text: str) -> str:
        """``text`` as the template writes a user message: Llama 3's, Gemma's and Qwen 3.5's trim
        it (a prompt read from a YAML block scalar ends in a newline). Read from a rendering of
        [Q, A, text]; ``text`` itself where that rendering does not keep the probes' frame."""
        written = self._user_texts.get(text)
        if written is None:
            try:
                two = self._render([{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A},
                                    {"role": "user", "content": text}], generation=True)
            except Exception:
                two = ""
            # (found from the probe answer on: the text before it holds a date in some templates)
            mark, end = _PROBE_A + self._glue, len(two) - len(self._tail)
            at = two.find(mark) + len(mark)
            framed = at >= len(mark) and at <= end and two.endswith(self._tail)
            written = two[at:end] if framed else text
            if len(self._user_texts) >= 4096:
                self._user_texts.clear()
            self._user_texts[text] = written
        return written

    def decode(self, ids: list[int]) -> str:
        """The text of the assistant message that ``ids`` (a sampled reply) complete: the
        ``reply_prefix`` the generation prompt opened, then the reply without special tokens,
        except those of :data:`KEPT_SPECIAL_TOKENS` (reasoning and tool-call markup, which
        reasoning and tool-call parsers read)."""
        if not self._kept or not any(i in self._kept for i in ids):
            return self.reply_prefix + self.tok.decode(ids, skip_special_tokens=True)
        parts, piece = [self.reply_prefix], []
        for i in ids:
            if i in self._kept:
                parts += [self.tok.decode(piece, skip_special_tokens=True), self._kept[i]]
                piece = []
            else:
                piece.append(i)
        return "".join(parts) + self.tok.decode(piece, skip_special_tokens=True)


#: Special tokens a reply's text keeps: where a reasoning block ends (a verifier reads the answer
#: after it) and tool-call markup that a harness's parser reads (Llama 3's ``<|python_tag|>``, which
#: starts code for its interpreter, Mistral's ``[TOOL_CALLS]``, Hermes blocks, Granite's
#: ``<|tool_call|>``): without them the verifier would judge another text than the one a harness runs.
KEPT_SPECIAL_TOKENS = ("<think>", "</think>", "<|python_tag|>", "[TOOL_CALLS]", "<tool_call>", "</tool_call>",
                       "<|tool_call|>", "<|channel>", "<channel|>")
#: Kept tokens a reply's text spells as another family's: Gemma 4's thought channel (its thinking
#: mode's ``<|channel>thought ... <channel|>`` before the answer) is a reasoning block, which
#: verifiers read as ``<think> ... </think>``.
SPELLED_AS = {"<|channel>": "<think>", "<channel|>": "</think>"}


def _kept_special_tokens(tokenizer) -> dict[int, str]:
    """``{id: text}`` of the :data:`KEPT_SPECIAL_TOKENS` the tokenizer marks special (as an added
    token flagged special, or among its named special tokens), which decoding would drop; the
    text as :data:`SPELLED_AS` spells it."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    named = set(getattr(tokenizer, "all_special_ids", None) or [])
    out = {}
    for i, token in added.items():
        text = getattr(token, "content", None)
        if text in KEPT_SPECIAL_TOKENS and (getattr(token, "special", False) or i in named):
            out[int(i)] = SPELLED_AS.get(text, text)
    return out


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _continuation(one: str, two: str):
    """How the rendering ``two`` of [Q, A, U] (generation prompt) continues ``one``, the rendering
    of [Q] (generation prompt): ``(history_drops, lead, glue, tail)`` where lead is whitespace
    the template puts before A, glue is the text between A and the user message U and tail
    follows U; or a reason it does not.

    Continuation means the model's A can follow ``one`` directly: ``two`` up to A is ``one`` plus
    whitespace the model writes itself (Mistral's space before an answer), or ``one`` minus a
    suffix of its generation prompt that the template leaves out of past turns (Qwen3's empty
    think block)."""
    i = two.find(_PROBE_A)
    j = two.find(_PROBE_U, i + 1) if i >= 0 else -1
    if _PROBE_Q not in one or i < 0 or j < 0:
        return "drops messages of a plain user / assistant / user conversation"
    before = two[:i]
    if before.startswith(one) and not before[len(one):].strip():
        drops, lead = "", before[len(one):]
    elif one.startswith(before) and two.endswith(one[len(before):]):
        drops, lead = one[len(before):], ""
    else:
        return "re-renders earlier turns"
    return drops, lead, two[i + len(_PROBE_A):j], two[j + len(_PROBE_U):]
