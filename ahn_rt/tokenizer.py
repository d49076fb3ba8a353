"""Runtime tokenizer: tokenizer.json through the ``tokenizers`` library, the Qwen ChatML prompt, streaming
detokenization and stop-string matching.

Nothing here imports transformers or tiktoken; tokenizer.json alone is enough.
"""
from __future__ import annotations

import json
import os

from .errors import AhnError, unordered

# Qwen2.5's chat template puts this system message first when the conversation has none.
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_REPLACEMENT = "\ufffd"


def _json_without_model(path: str) -> bool:
    """True when ``path`` holds valid JSON that is not a tokenizer.json (an object without "model", or no
    object at all): a config.json or generation_config.json passed as the tokenizer."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return not isinstance(data, dict) or "model" not in data


class Tokenizer:
    """A loaded tokenizer.json. Build it with ``Tokenizer.from_file(path)``."""

    def __init__(self, tok, path: str = ""):
        self._tok = tok
        self.path = path
        self._bytes: dict[int, bytes] = {}   # token_bytes, filled on first use of each id

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Load ``path`` (a tokenizer.json, or a folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            what = "is not a regular file" if os.path.exists(path) else "not found"  # e.g. /dev/null, a fifo
            raise AhnError(f"tokenizer file {what}: {path}; pass the model folder's tokenizer.json "
                           "(or build one with init_weights --tokenizer qwen2.5)")
        try:
            import tokenizers
        except ImportError:
            raise AhnError("the tokenizers package is missing; pip install tokenizers") from None
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if _json_without_model(path):   # e.g. config.json given as the tokenizer: its parse error misleads
                raise AhnError(f"{path} is not a tokenizer.json (valid JSON, but no tokenizer \"model\" in it); "
                               "pass the model folder's tokenizer.json (or build one with init_weights "
                               "--tokenizer qwen2.5)") from None
            raise AhnError(f"cannot read tokenizer file {path} ({msg}); replace it with a valid "
                           "tokenizer.json (or rebuild it with init_weights --tokenizer qwen2.5)") from None
        return cls(tok, path)

    @property
    def vocab_size(self) -> int:
        """Number of tokenizer ids including added tokens (151665 for Qwen2.5; the model's embedding
        table is usually padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def check_fits(self, rows: int, path, model: str, fix: str):
        """AhnError naming ``path`` and ``fix`` when this tokenizer has ids past the ``rows`` of ``model``'s
        embedding: another model's tokenizer, whose ids failed one by one later ("token id 14990 is outside the
        vocabulary"). A smaller tokenizer is normal: Qwen pads its embedding past the tokenizer's ids."""
        if self.vocab_size > rows:
            raise AhnError(f"the tokenizer {path} has {self.vocab_size} tokens but the {model}'s embedding has "
                           f"{rows} rows (ids {rows}..{self.vocab_size - 1} have none); {fix}")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing is added, but special tokens written in the text (such as
        <|im_start|>) are recognized as those tokens. Text that is not valid Unicode (undecodable bytes
        smuggled in as surrogates, e.g. from a command line) is an AhnError."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def _specials(self) -> dict:
        """{id: text} of the special tokens (added tokens marked special: <|im_start|>, <|endoftext|>, ...)."""
        specials = self.__dict__.get("_special")
        if specials is None:
            specials = self._special = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()
                                        if t.special}
        return specials

    def special_ids(self) -> frozenset:
        """Ids of the special tokens, which ``decode(..., skip_special_tokens=True)`` leaves out."""
        return frozenset(self._specials())

    def has_special_text(self, text: str) -> bool:
        """Whether ``text`` spells a special token (such as <|im_end|>), which ``encode`` would read as that token."""
        return any(s in text for s in self._specials().values())

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: a special token written in it is spelled in ordinary tokens (a
        chat message's "<|im_end|>" must not end its turn). Otherwise as ``encode``."""
        check_text(text)
        plain = self.__dict__.get("_plain")
        if plain is None:   # a copy that reads special tokens as text (the shared one stays as it is)
            import tokenizers
            plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (token ids of any integer type: a list, a 1-D tensor), special tokens included;
        invalid UTF-8 becomes U+FFFD. Anything else is an AhnError (it was the tokenizers library's
        OverflowError or TypeError)."""
        if unordered(ids):   # a set's ids in hash order, a dict's keys: text the caller never wrote
            raise AhnError(f"decode needs a list of token ids, got {type(ids).__name__}, which has no order; give a list")
        try:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        except (TypeError, OverflowError):
            raise AhnError(f"decode needs a list of token ids (integers from 0 to 2**32 - 1), got {ids!r:.100}") from None

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (as OpenAI's logprobs report them): with a byte-level BPE
        (Qwen's) a token may hold part of a UTF-8 character, which ``decode([token_id])`` shows as U+FFFD;
        its bytes are exact. Added tokens (``<|im_end|>``) give their text's UTF-8; an id the tokenizer does not
        know (the model's embedding is padded past it) gives b"". Tokenizers without a byte-level decoder give
        the UTF-8 of ``decode([token_id])`` (a SentencePiece byte-fallback token ``<0xNN>``: that byte)."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._raw_bytes(int(token_id))
        return b

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id) if 0 <= token_id < 2 ** 32 else None
        if piece is None:
            return b""
        if token_id in self._added_ids():
            return piece.encode("utf-8")
        if _is_byte_level(self._tok):
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self.decode([token_id]).encode("utf-8")

    def _added_ids(self) -> set:
        ids = self.__dict__.get("_added")
        if ids is None:
            ids = self._added = set(self._tok.get_added_tokens_decoder())
        return ids

    def token_id(self, token: str) -> int | None:
        """Id of the token spelled ``token`` (e.g. "<|im_end|>"), or None."""
        return self._tok.token_to_id(token)


def _is_byte_level(tok) -> bool:
    import tokenizers
    return isinstance(tok.decoder, tokenizers.decoders.ByteLevel)


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of ``tokenizer_build.bytes_to_unicode``)."""
    if not _BYTE_DECODER:
        from .tokenizer_build import bytes_to_unicode
        _BYTE_DECODER.update({c: b for b, c in enumerate(bytes_to_unicode())})
    return _BYTE_DECODER


def check_text(text, what: str = "the prompt", fix: str = "give UTF-8 text"):
    """AhnError (one line) unless ``text`` is a str that can be written as UTF-8; ``fix`` ends the message."""
    if not isinstance(text, str):
        raise AhnError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what_byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"code point U+{ch:04X}"
        raise AhnError(f"{what} is not valid UTF-8 ({what_byte} at character {e.start}); "
                       f"{fix}") from None


def decode_utf8(data: bytes, what: str) -> str:
    """Strict UTF-8 decoding with a one-line AhnError naming the first bad byte. A leading byte order mark
    (what Windows editors write first) is no text: dropped, as the training data loader drops it."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise AhnError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "save it as UTF-8") from None


def apply_chat_template(prompt: str, system: str | None = None) -> str:
    """One-turn Qwen ChatML prompt ending with the open assistant turn.

    ``system=None`` uses Qwen2.5's default system message; any string (even "") is used as given.
    """
    if system is None:
        system = QWEN25_DEFAULT_SYSTEM
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def _ids_of(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError
            out.append(v)
        return out
    raise TypeError


def eos_ids_from(folder) -> list[int]:
    """End-of-sequence ids for the model in ``folder``: ``eos_token_id`` (an int or a list) of
    generation_config.json, else of config.json; [] when neither file gives one."""
    folder = os.fspath(folder)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise AhnError(f"cannot read {path} ({e}); fix or remove the file") from None
        if not isinstance(data, dict):
            raise AhnError(f"{path} is not a JSON object; fix or remove the file")
        try:
            ids = _ids_of(data.get("eos_token_id"))
        except TypeError:
            raise AhnError(f"eos_token_id in {path} must be an integer or a list of integers; "
                           "fix the file") from None
        if ids:
            return list(dict.fromkeys(ids))
    return []


class StreamDecoder:
    """Incremental detokenization for streaming output.

    ``push(id)`` returns the text that became complete with that token; text is held back while the
    decoded window ends with U+FFFD (a byte-level token may end in the middle of a UTF-8 character).
    Only the tokens since the last emitted boundary (plus one earlier token of context, which decoders
    that strip a leading space need) are decoded, so each push costs O(pending tokens), not O(output).
    For any id sequence that decodes cleanly, all pushes + ``flush()`` == ``tokenizer.decode(ids)``; with
    ``skip_special``, the special tokens (``Tokenizer.special_ids``) give no text and the sequence decodes as
    the one without them.

    A valid UTF-8 character is at most 4 bytes and every token carries at least one byte, so a clean
    sequence never needs more than 4 tokens held back; after ``max_pending`` held tokens the text is
    emitted anyway (it is invalid UTF-8 the model produced, or text that really ends with U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, max_pending: int = 8, skip_special: bool = False):
        self._decode = tokenizer.decode
        self._skip = tokenizer.special_ids() if skip_special else frozenset()
        self._max_pending = max(4, int(max_pending))
        self._ids: list[int] = []      # window: [context tokens][emitted-boundary ...][pending tokens]
        self._read = 0                 # index in _ids where not-yet-emitted tokens start
        self._prefix_text = ""         # decode(_ids[:_read]), the already-emitted text of the window

    def push(self, token_id: int) -> str:
        if token_id in self._skip:   # skip_special: as if the token were not there (decode's skip_special_tokens)
            return ""
        ids = self._ids
        ids.append(int(token_id))
        text = self._decode(ids)
        new = text[len(self._prefix_text):]
        if not new or text.endswith(_REPLACEMENT):
            if len(ids) - self._read <= self._max_pending:
                return ""
            # forced: start a fresh window with no context (this is not a clean boundary anyway)
            ids.clear()
            self._read, self._prefix_text = 0, ""
            return new
        # the new window is the tokens just emitted; its text is exactly `new` (they start at a boundary)
        del ids[:self._read]
        self._read = len(ids)
        self._prefix_text = new
        return new

    def flush(self) -> str:
        """Whatever is still held back (possibly ending with U+FFFD); the decoder starts over."""
        rest = ""
        if len(self._ids) > self._read:
            rest = self._decode(self._ids)[len(self._prefix_text):]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return rest


class StopMatcher:
    """Cuts streamed text at the first occurrence of any stop string.

    ``push(piece) -> (emit, stopped)``: ``emit`` is text that is safe to show; a suffix that could still
    grow into a stop string is held back. Once a stop string is seen, ``stopped`` is True, ``emit`` ends
    just before the stop string and every later push returns ("", True). ``flush()`` returns the held
    text at the end of generation (nothing once stopped).
    """

    def __init__(self, stops=()):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in dict.fromkeys(stops or ()) if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        # earliest stop occurrence; the held part alone holds none, so the search is over new matches
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        rest, self._held = ("" if self.stopped else self._held), ""
        return rest


def text_offsets(tokenizer: Tokenizer, ids) -> tuple[str, list[int]]:
    """The text of ``ids`` as a stream decodes it (``StreamDecoder``: == ``tokenizer.decode(ids)`` for a clean
    sequence) and where each token's text starts in it, in characters, as generated tokens' logprobs count them
    (tokens that together make one character share its offset). The echoed prompt of the server's ``echo``."""
    dec, parts, offsets, n = StreamDecoder(tokenizer), [], [], 0
    for t in ids:
        offsets.append(n)
        piece = dec.push(t)
        parts.append(piece)
        n += len(piece)
    parts.append(dec.flush())
    return "".join(parts), offsets
