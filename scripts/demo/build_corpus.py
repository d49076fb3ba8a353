"""Build the demo model's corpus: the Python standard library's own .py sources, a byte-level BPE tokenizer
trained on them, and uint16 token files, bit for bit reproducible.

    python scripts/demo/build_corpus.py --out data/demo          # ~1 min on 2 CPU cores

Inputs: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded), read in sorted
relative-path order. Files that are empty, not valid UTF-8, or describe this particular build
(``_sysconfigdata_*.py``, ``config-*/python-config.py``) are skipped and listed in the manifest.

Splits, by file, from sha256(relative path) (so a file never straddles two splits):
  heldout  ~2%   evaluation only: never seen by the teacher, the tokenizer or the distillation;
  distill  ~10%  the AHN distillation sequences: never seen by the teacher, so the teacher predicts them
                 from context rather than from memorised weights (a teacher trained for many epochs
                 memorises its own split, which shrinks the SWA -> full gap the memory is distilled on);
  train    rest  teacher pretraining.
The tokenizer is trained on train + distill text.

Outputs under --out: tokenizer.json (vocab 4096 incl. 3 special tokens; digits always single tokens),
train.bin / distill.bin / heldout.bin (little-endian uint16 ids, every file followed by <|endoftext|>),
manifest.json (Python version, per-split file lists, byte and token counts, sha256 of every output).
Running it twice gives byte-identical outputs (``--check`` compares against an existing manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT = "<|endoftext|>"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def excluded_by_name(rel: str) -> str | None:
    """Why a .py file is left out by its path alone (None: keep)."""
    parts = rel.split("/")
    if parts[0] == "site-packages":
        return "site-packages"
    if parts[-1].startswith("_sysconfigdata_"):
        return "build-specific"
    if parts[0].startswith("config-") and len(parts) > 1:
        return "build-specific"
    return None


def list_sources(root: Path) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """[(relative path, text)] in sorted relative-path order, and {reason: [skipped paths]}."""
    root = Path(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "site-packages" or Path(dirpath) != root]
        for name in filenames:
            if name.endswith(".py"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    rels.sort()
    files, skipped = [], {}
    for rel in rels:
        why = excluded_by_name(rel)
        data = b""
        if why is None:
            p = root / rel
            if p.is_symlink() or not p.is_file():
                why = "not a regular file"
            else:
                data = p.read_bytes()
                if not data.strip():
                    why = "empty"
                elif b"\x00" in data:
                    why = "NUL bytes"
        if why is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                why = "not UTF-8"
        if why is not None:
            skipped.setdefault(why, []).append(rel)
            continue
        files.append((rel, text))
    return files, skipped


def split_of(rel: str, heldout_permille: int, distill_permille: int) -> str:
    """'heldout', 'distill' or 'train', from the first 8 bytes of sha256(relative path)."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % 1000
    if h < heldout_permille:
        return "heldout"
    if h < heldout_permille + distill_permille:
        return "distill"
    return "train"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization; every digit its own pre-token, so a number of
    n digits is n tokens) with the special tokens first (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_docs(tok, texts: list[str]):
    """All documents as one uint16 array, each followed by <|endoftext|>."""
    import numpy as np
    eot = tok.token_to_id(EOT)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eot], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: Path, data: bytes):
    """Atomically and durably (the runtime's atomic_write: a temporary of this process, flushed to the disk,
    renamed over ``path``): a crash leaves the old file or the whole new one, never a truncated split."""
    from ahn_rt.weights import atomic_write
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def build(root: Path, out: Path, *, vocab_size=4096, heldout_permille=20, distill_permille=100,
          log=print) -> dict:
    import numpy as np
    root, out = Path(root), Path(out)
    files, skipped = list_sources(root)
    if not files:
        from ahn_rt.errors import AhnError
        raise AhnError(f"no usable .py files under {root}; give a folder of Python sources")
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "distill": [], "heldout": []}
    for rel, text in files:
        splits[split_of(rel, heldout_permille, distill_permille)].append((rel, text))
    log(f"{len(files)} files ({sum(len(t.encode()) for _, t in files):,} bytes) under {root}; "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    tok = train_tokenizer([t for _, t in splits["train"] + splits["distill"]], vocab_size)
    write_bytes(out / "tokenizer.json", (tok.to_str(pretty=True) + "\n").encode("utf-8"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import longrange
    templates = longrange.Templates.from_tokenizer(out / "tokenizer.json")
    manifest = {
        "what": "demo corpus: CPython standard library .py sources, byte-level BPE, uint16 ids",
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "stdlib": "sysconfig.get_paths()['stdlib'] (site-packages excluded)",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
        "digit_tokens": {str(d): tok.token_to_id(str(d)) for d in range(10)},
        "templates": dict(templates.to_json(), text={"statement": longrange.STATEMENT,
                                                     "question": longrange.QUESTION,
                                                     "newline": longrange.NEWLINE}),
        "split_rule": f"sha256(relative path)[:8] big-endian mod 1000: < {heldout_permille} heldout, "
                      f"< {heldout_permille + distill_permille} distill, else train",
        "skipped": {k: v for k, v in sorted(skipped.items())},
        "splits": {}, "sha256": {},
    }
    for name in ("train", "distill", "heldout"):
        docs = splits[name]
        ids = encode_docs(tok, [t for _, t in docs])
        write_bytes(out / f"{name}.bin", ids.astype("<u2").tobytes())
        nbytes = sum(len(t.encode("utf-8")) for _, t in docs)
        manifest["splits"][name] = {"files": len(docs), "bytes": nbytes, "tokens": int(ids.size),
                                    "bytes_per_token": round(nbytes / max(1, ids.size - len(docs)), 3),
                                    "paths": [r for r, _ in docs]}
        log(f"{name}: {len(docs)} files, {nbytes:,} bytes, {ids.size:,} tokens")
    for name in ("tokenizer.json", "train.bin", "distill.bin", "heldout.bin"):
        manifest["sha256"][name] = sha256_file(out / name)
    write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_args import ArgParser, run, typed_number
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stdlib", default=None, help="source folder (default: this Python's stdlib)")
    ap.add_argument("--out", default="data/demo")
    # the byte alphabet and the special tokens at least; ids are stored as uint16
    ap.add_argument("--vocab-size", type=typed_number(int, 256 + len(SPECIAL_TOKENS), "an integer", maximum=2 ** 16),
                    default=4096)
    ap.add_argument("--heldout-permille", type=typed_number(int, 1, "an integer", maximum=1000), default=20,
                    help="files per thousand held out for the evaluation (1 to 1000)")
    ap.add_argument("--distill-permille", type=typed_number(int, 0, "an integer", maximum=1000), default=100)
    ap.add_argument("--check", action="store_true",
                    help="fail unless the outputs' sha256 equal those of the manifest already in --out")
    args = ap.parse_args(argv)
    if args.heldout_permille + args.distill_permille > 1000:
        ap.error(f"--heldout-permille {args.heldout_permille} + --distill-permille {args.distill_permille} is "
                 "more than 1000 (the whole corpus)")
    return run(build_checked, args)


def build_checked(args) -> int:
    """The inputs and --out checked before the minute of work, then ``build``."""
    from ahn_rt.errors import AhnError
    from demo_args import check_out_dir, need_folder, read_json
    out = Path(args.out)
    if args.stdlib is not None:
        need_folder(args.stdlib, "--stdlib", "a folder of .py sources (or leave --stdlib out)")
    check_out_dir(out)
    before = None
    if args.check:
        what = "an --out folder with the manifest.json of an earlier build to check against"
        manifest = read_json(need_folder(out, "--out", what, ["manifest.json"]) / "manifest.json", "--out", what)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
            raise AhnError(f"--out {out}: manifest.json has no sha256 record; give {what}")
        before = manifest["sha256"]
    # --check builds beside the earlier outputs, never over them: a failed check replaced the build it
    # checked against (and the next --check passed)
    target = Path(tempfile.mkdtemp(prefix=".check-", dir=out)) if args.check else out
    try:
        m = build(Path(args.stdlib) if args.stdlib else stdlib_dir(), target, vocab_size=args.vocab_size,
                  heldout_permille=args.heldout_permille, distill_permille=args.distill_permille)
        manifest_digest = digest_of_manifest(target)
    finally:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
    if before is not None and before != m["sha256"]:
        differ = sorted(n for n in set(before) | set(m["sha256"]) if before.get(n) != m["sha256"].get(n))
        print(f"CHECK FAILED: outputs differ from the previous manifest ({', '.join(differ)}); the earlier build "
              f"in {out} is kept", file=sys.stderr)
        return 1
    for name, digest in m["sha256"].items():
        print(f"{digest}  {out / name}")
    print(f"{manifest_digest}  {out / 'manifest.json'}")
    if before is not None:
        print("check: identical to the previous build")
    return 0


def digest_of_manifest(out: Path) -> str:
    return sha256_file(Path(out) / "manifest.json")


if __name__ == "__main__":
    sys.exit(main())
