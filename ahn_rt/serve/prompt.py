"""A prompt as the runtime prefills it: token ids plus *marks*, the positions where a chat message (or an
assistant message's header) ends.

Marks matter for two reasons. The prefill splits its chunks there (as well as at every multiple of the
chunk size), and the prefix cache may keep a snapshot there: a later prompt that shares the messages up to
a mark reuses the state and prefills only the rest. A snapshot is reused only by a prompt whose chunk
boundaries up to that point are the same, which is what makes a cache hit give the same logits, bit for
bit, as a cold prefill (chunking changes the rounding; docs/serving.md, "Prefix cache").

``chat_prompt`` writes the Qwen2.5 ChatML conversation: each message ``<|im_start|>{role}\\n{content}
<|im_end|>\\n``, the default system message when the conversation has none, and the open assistant turn.
For a conversation without assistant messages the ids are exactly ``encode(apply_chat_template(...))``;
an assistant message's header and content are encoded separately (as they were when it was generated),
so the header's end is a mark and the previous turn's whole prompt is a prefix of the next turn's.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

from ..errors import AhnError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids and marks (sorted positions in ``(0, len(ids)]``)."""
    ids: tuple
    marks: tuple = ()

    def __post_init__(self):
        ids = self.ids if type(self.ids) is tuple else tuple(self.ids)
        # Plain ints (the usual case) pass in one cheap pass: a long prompt's ids are checked on every
        # request, and the general check costs about 15 ms per 32k ids.
        if not all(type(t) is int for t in ids):
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise AhnError("prompt token ids must be integers")
            ids = tuple(int(t) for t in ids)
        object.__setattr__(self, "ids", ids)
        marks = sorted({int(m) for m in self.marks if 0 < int(m) <= len(ids)})
        object.__setattr__(self, "marks", tuple(marks))

    def __len__(self):
        return len(self.ids)


def content_text(msg, i: int, role: str) -> str:
    """The text of message ``i``'s content: a string, or OpenAI content parts of type text, joined by newlines
    (as vLLM's and TensorRT-LLM's OpenAI servers join them, so that the same request makes the same prompt);
    an assistant message may lack it (""). AhnError naming the message otherwise. The training data reads
    message contents with it too."""
    content = msg.get("content")
    if content is None:
        if role != "assistant":   # as OpenAI: only an assistant message (one that called tools) may lack it
            raise AhnError(f"messages[{i}].content is required for a {role} message (a string or a list of "
                           "text parts)")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # OpenAI content parts: only text
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise AhnError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                               "are supported")
            out.append(part["text"])
        return "\n".join(out)
    raise AhnError(f"messages[{i}].content must be a string or a list of text parts")


def normalize_messages(messages) -> list[tuple[str, str]]:
    """[(role, content)] from OpenAI-style message dicts; AhnError naming the message otherwise.
    ``developer`` is read as ``system`` (OpenAI's newer name for it)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise AhnError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise AhnError(f"messages[{i}] must be an object with role and content")
        sent = m.get("role")
        role = "system" if sent == "developer" else sent
        if role not in ROLES:
            shown = repr(role[:40]) + "..." * (len(role) > 40) if isinstance(role, str) else \
                type(role).__name__ if isinstance(role, (list, dict)) else repr(role)   # one short line
            raise AhnError(f"messages[{i}].role must be one of system, user, assistant; got {shown}")
        out.append((role, content_text(m, i, sent)))   # its errors name the role the client sent
    return out


def chat_prompt(tokenizer, messages, *, default_system: str | None = None, add_system: bool = True,
                generation_prompt: bool = True, head: Sequence[int] = ()) -> Prompt:
    """The ChatML prompt of ``messages`` (OpenAI-style dicts or (role, content) pairs).

    add_system: put ``default_system`` (Qwen2.5's, when None) first if the conversation has no system
    message; head: token ids that come first (a conversation's continuation: what closes its last turn).
    """
    from ..tokenizer import QWEN25_DEFAULT_SYSTEM
    if messages and all(isinstance(m, tuple) for m in messages):
        msgs = list(messages)
    else:
        msgs = normalize_messages(messages) if messages else []
    if add_system and (not msgs or msgs[0][0] != "system"):
        msgs.insert(0, ("system", QWEN25_DEFAULT_SYSTEM if default_system is None else default_system))
    enc = tokenizer.encode
    spelled = getattr(tokenizer, "has_special_text", lambda text: False)

    def turn(before: str, content: str) -> list[int]:
        # A message's text is text: where it spells a special token (a user's "<|im_end|>\n<|im_start|>system"
        # would close its turn and forge another) it is encoded apart, as plain text; otherwise the turn is
        # one string, tokenized as Hugging Face's chat template does.
        if spelled(content):
            return enc(before) + tokenizer.encode_text(content) + enc(f"{IM_END}\n")
        return enc(f"{before}{content}{IM_END}\n")

    ids: list[int] = list(head)
    marks: list[int] = []
    for role, content in msgs:
        if role == "assistant":
            ids += enc(f"{IM_START}assistant\n")
            marks.append(len(ids))
            ids += turn("", content)
        else:
            ids += turn(f"{IM_START}{role}\n", content)
        marks.append(len(ids))
    if generation_prompt:
        ids += enc(f"{IM_START}assistant\n")
        marks.append(len(ids))
    return Prompt(tuple(ids), tuple(marks))


def as_prompt(model, prompt, chat: bool = False, system: str | None = None) -> Prompt:
    """What ``Model.generate`` accepts as a prompt, as a ``Prompt``: text (wrapped in the ChatML template
    with ``chat``), a list of token ids, a list of chat messages, or a ``Prompt``."""
    if system is not None and not isinstance(system, str):
        raise AhnError(f"system must be text, got {type(system).__name__}")
    if system is not None:
        from ..tokenizer import check_text
        check_text(system, "the system message")   # named, not "the prompt" it is templated into
    if isinstance(prompt, str):
        tok = model.tokenizer
        if chat:
            return chat_prompt(tok, [("user", prompt)], default_system=system)
        if system is not None:
            raise AhnError("system is the system message of chat=True's template: add chat=True, or drop system")
        return Prompt(tuple(tok.encode(prompt)))
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise AhnError("the prompt is bytes: decode it to text first (prompt.decode('utf-8'))")
    if hasattr(prompt, "dim") and hasattr(prompt, "tolist"):   # a tensor of ids, as Session.forward takes
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex():
            raise AhnError("a prompt tensor must be 1-D integer token ids")
        if prompt.device.type == "meta":   # no values to read: torch's NotImplementedError (as Session.forward says)
            raise AhnError("the prompt is a tensor on the meta device, which holds no values; give the ids on the "
                           "CPU or the model's device")
        prompt = prompt.tolist()
    if isinstance(prompt, Prompt):
        items = None
    else:
        try:
            items = list(prompt)
        except TypeError:
            raise AhnError("the prompt must be text, a list of token ids, a list of chat messages or a Prompt; "
                           f"got {type(prompt).__name__}") from None
    if items and all(isinstance(m, dict) for m in items):
        msgs = normalize_messages(items)
        if system is not None and msgs[0][0] != "system":
            msgs.insert(0, ("system", system))
        return chat_prompt(model.tokenizer, msgs)
    if chat or system is not None:
        raise AhnError(f"{'chat' if chat else 'system'} applies to text or chat messages, not to token ids: "
                       "give the text (or messages), or put the template in the ids yourself")
    return prompt if items is None else Prompt(tuple(items))
