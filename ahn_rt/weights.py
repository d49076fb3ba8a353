"""The one place that loads and writes weights, under one key map.

Accepts a ``.safetensors`` file, a Hugging Face checkpoint folder (``model.safetensors`` or shards listed in
``model.safetensors.index.json``), and optionally a separate AHN-only checkpoint (file or folder) with the
official key names ``model.layers.N.ahn.fn.*`` (docs/semantics.md §8). Loading is strict: every expected tensor
must be present with the right shape and every stored tensor must be used, else one ``AhnError`` lists
what is wrong. Pickle checkpoints are refused, never unpickled.

Tensors are read one at a time from memory-mapped files, converted to the runtime dtype and moved to the
device, so peak host memory stays near one copy of the model. The per-layer projections are fused here
into the layout the model computes with:

* ``w_in``  = [q | k | v | memory rows] ([H*D + 2*Hkv*D (+ R), d]), the memory rows being the AHN module's
  per-token projections (GatedDeltaNet: [a | b | g], R = 3H; Mamba2: [dt | g], R = 2H; ``Memory.load``),
  ``b_in`` the matching bias (zeros for bias-free memory rows): one GEMM gives everything a token needs
  before attention;
* ``w_gu``  = [gate | up] rows ([2I, d]).

``write_checkpoint`` writes safetensors atomically under the same names (``base_shapes`` /
``ahn_shapes``), for ``init_weights`` and the trainer.
"""
from __future__ import annotations

import dataclasses
import json
import errno
import os
import re
import threading
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import Config, load_json, parse_config
from .errors import AhnError, as_int

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The stored dtypes a weight may have (safetensors' names): converted to the runtime dtype at load. An integer,
# bool or 8-bit float tensor is a quantized or damaged checkpoint, whose values a cast would silently garble.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_SAFETENSORS_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


# ----------------------------------------------------------------------------------------------
# The one key map: checkpoint tensor names and shapes, for reading (this loader) and for writing
# (init_weights, the trainer). Hugging Face names for the base, the official names for AHN
# (docs/semantics.md §8), each memory variant's parameters from its module (``ahn_rt.memory``, §11).
# ----------------------------------------------------------------------------------------------
def ahn_key(layer: int, name: str) -> str:
    """Checkpoint name of AHN parameter ``name`` of decoder layer ``layer``."""
    return f"model.layers.{layer}.ahn.fn.{name}"


def is_ahn_key(key: str) -> bool:
    return ".ahn." in key or key.startswith("ahn.")


def layer_parts(c: Config, n: int) -> dict[str, list[tuple[str, tuple]]]:
    """Layer ``n``'s base tensors as the runtime and the trainer hold them: role -> the checkpoint tensors
    (Hugging Face names, shapes) concatenated along dim 0 into it (q|k|v and gate|up fused into one GEMM
    each). The one key map of the base layers: ``base_shapes``, ``fuse_layer`` and ``split_layer`` read it."""
    d, i = c.hidden_size, c.intermediate_size
    p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
    parts = {"ln_in": [(p + "input_layernorm.weight", (d,))],
             "w_qkv": [(a + "q_proj.weight", (c.q_size, d)), (a + "k_proj.weight", (c.kv_size, d)),
                       (a + "v_proj.weight", (c.kv_size, d))],
             "w_o": [(a + "o_proj.weight", (d, c.q_size))],
             "ln_post": [(p + "post_attention_layernorm.weight", (d,))],
             "w_gu": [(p + "mlp.gate_proj.weight", (i, d)), (p + "mlp.up_proj.weight", (i, d))],
             "w_down": [(p + "mlp.down_proj.weight", (d, i))]}
    if c.attention_bias:
        parts["b_qkv"] = [(a + "q_proj.bias", (c.q_size,)), (a + "k_proj.bias", (c.kv_size,)),
                          (a + "v_proj.bias", (c.kv_size,))]
        if c.family == "qwen3":
            parts["b_o"] = [(a + "o_proj.bias", (d,))]
    if c.qk_norm:
        parts["q_norm"] = [(a + "q_norm.weight", (c.head_dim,))]
        parts["k_norm"] = [(a + "k_norm.weight", (c.head_dim,))]
    return parts


def fuse_layer(c: Config, n: int, get) -> dict[str, torch.Tensor]:
    """Layer ``n``'s base tensors by role (``layer_parts``), ``get(key)`` giving each checkpoint tensor."""
    return {role: get(ks[0][0]) if len(ks) == 1 else torch.cat([get(k) for k, _ in ks])
            for role, ks in layer_parts(c, n).items()}


def split_layer(c: Config, n: int, fused: dict) -> dict[str, torch.Tensor]:
    """The inverse of ``fuse_layer``: {Hugging Face key: tensor} (views of ``fused``)."""
    out = {}
    for role, ks in layer_parts(c, n).items():
        out.update(zip([k for k, _ in ks], fused[role].split([shape[0] for _, shape in ks])))
    return out


def base_shapes(c: Config) -> dict[str, tuple]:
    """Every tensor of the base model (Hugging Face names) -> shape. A tied model may also carry
    ``lm_head.weight`` (accepted, not needed)."""
    d = c.hidden_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    for n in range(c.num_layers):
        shapes.update(part for ks in layer_parts(c, n).values() for part in ks)
    return shapes


def ahn_shapes(c: Config, implementation: str | None = None) -> dict[str, tuple]:
    """Every AHN tensor (official names) -> shape, for ``implementation`` (official or short name; default:
    the config's, else GatedDeltaNet)."""
    from . import memory
    params = memory.get(implementation or c.ahn_implementation).params(c)
    return {ahn_key(n, name): tuple(shape) for n in range(c.num_layers) for name, shape in params.items()}


def write_checkpoint(out, tensors: dict, config: dict | None = None, *, config_json: bool = False,
                     metadata: dict[str, str] | None = None):
    """Write ``tensors`` to the safetensors file ``out`` atomically (a temporary file renamed into
    place: nothing is ever half-written). ``config`` goes into the metadata key "config" (what this
    loader reads when no config.json is beside the file); with ``config_json`` it is also written as
    config.json beside the file (atomically too). Raises AhnError with one line when the path cannot be
    written. ``metadata``: more header entries (strings)."""
    from safetensors.torch import save_file
    out = Path(os.fspath(out))
    meta = {"format": "pt", **(metadata or {})}
    if config is not None:
        meta["config"] = json.dumps(config)
    try:
        check_writable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        def write(tmp):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
            _sort_metadata(tmp)
        atomic_write(out, write)
        if config_json and config is not None:
            atomic_write_text(out.parent / "config.json", json.dumps(config, indent=2) + "\n")
    except AhnError:   # check_writable's and atomic_write_text's own line, already naming the path
        raise
    except OSError as e:
        raise AhnError(f"cannot write {out}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own error type for an unwritable path
        raise AhnError(f"cannot write {out}: {_safetensors_reason(e)}") from None


def _safetensors_reason(e: Exception) -> str:
    """Why safetensors could not write a file, without the path of its own temporary file (it writes
    '.tmpXXXXXX' beside the target: 'Error while serializing: I/O error: Permission denied (os error 13)
    at path "/x/.tmpAbC123"'): the OS's words for the error number, else the first line less that path."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    code = re.search(r"\(os error (\d+)\)", msg)
    if code:
        return os.strerror(int(code.group(1)))
    return re.sub(r' at path ".*"$', "", msg)


def check_writable(out: Path):
    """Raise AhnError (one line) unless a file could be created at ``out``: checked before anything is
    written, so that a bad path leaves nothing behind. Returns the nearest existing folder above ``out``."""
    out = Path(os.fspath(out))
    try:
        is_dir = out.is_dir()
        special = not is_dir and out.exists() and not out.is_file()
        parent = out.parent
        while not parent.exists():
            parent = parent.parent
    except OSError as e:   # a folder on the way the user may not enter, a name too long
        raise AhnError(f"cannot write {out}: {e.strerror or e}") from None
    if is_dir:
        raise AhnError(f"cannot write {out}: it is a folder; give a file name ending in {out.suffix or '.safetensors'}")
    if special:   # /dev/null, a pipe, a socket: the atomic write's rename replaced it (as root, /dev/null itself)
        raise AhnError(f"cannot write {out}: it is not a regular file (a device, a pipe or a socket), which writing "
                       f"would replace; give a file name ending in {out.suffix or '.safetensors'}")
    if not parent.is_dir():
        raise AhnError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AhnError(f"cannot write {out}: folder {parent} is not writable")
    return parent


_SAMPLES = 64   # values hash_samples takes from a tensor


def hash_samples(h, t: torch.Tensor):
    """Feed ``t``'s shape, dtype and ``_SAMPLES`` evenly spaced values into the hash ``h`` (the runtime's model
    digest, ``state_io``; the training run's base fingerprint)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].float().cpu()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(repr([round(float(x), 6) for x in sample]).encode())


def _sort_metadata(path: Path):
    """Rewrite a just-saved safetensors file's header with its metadata keys in sorted order, in place.
    safetensors keeps the metadata in a hash map, so the same tensors and metadata came out in a different
    key order (other bytes, another sha256) from run to run; a deterministic run must write the same file.
    The header keeps its length (the same entries, padded with spaces as safetensors pads it)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > n:   # never: the same entries, compact; a longer header would move the data
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def atomic_write_text(path, text: str):
    """Write a small text file atomically (AhnError with one line on failure)."""
    path = Path(os.fspath(path))
    try:
        check_writable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise AhnError(f"cannot write {path}: {e.strerror or e}") from None


def atomic_write(path: Path, write):
    """``write(tmp)`` a temporary file beside ``path``, flush it to the disk, then rename it over ``path``:
    a reader (or a restart after a crash or power loss) sees the old file or the whole new one. Without
    the fsync the rename can reach the disk before the data, leaving a truncated file where the old one
    was."""
    # per process and thread: two threads saving to one path must not share (and delete) one temporary; the
    # name cut to 128 characters, so that a name near the file system's limit (255) is no "File name too long"
    tmp = path.with_name(f".{path.name[:128]}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            try:
                os.fsync(f.fileno())
            except OSError as e:   # a file system that has no fsync (some network / FUSE mounts): go on
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
                    raise          # a real write failure (ENOSPC, EIO): the file is not on the disk
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:   # the rename itself (best effort: not every system can open a folder)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclasses.dataclass
class LayerWeights:
    ln_in: torch.Tensor
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None   # Qwen3 with attention_bias (Qwen2's o_proj never has a bias)
    ln_post: torch.Tensor
    w_gu: torch.Tensor
    w_down: torch.Tensor
    # The AHN memory's own tensors in its runtime layout (``Memory.load``; None outside mode 'ahn'); its
    # per-token projections are rows of w_in / b_in.
    mem: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass
class Weights:
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor      # the embedding itself when tied
    layers: list[LayerWeights]


# ----------------------------------------------------------------------------------------------
# Finding files and the config
# ----------------------------------------------------------------------------------------------
def _refuse_pickle(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AhnError(f"{path} is a pickle checkpoint, which ahn_rt never loads (it can run code); "
                       "convert it to .safetensors first")


def check_safetensors(path: Path, fix: str = "re-download or re-export it"):
    """A readable header, a file at least as long as the header says (catches truncation), and a header the
    safetensors library accepts (a list, an entry without two offsets, an unknown dtype, a shape its bytes do
    not hold, metadata that is not strings: its SafetensorError was a traceback); ``fix`` ends the error's
    line (what to do about it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        # the end of the data, from the entries that have two integer offsets (safe_open judges the rest)
        offsets = [v.get("data_offsets") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        end = max((o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and as_int(o[1]) is not None),
                  default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, header needs {8 + n + end}")
        with safe_open(str(path), framework="pt"):
            pass
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, SafetensorError) as e:
        raise AhnError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]}); {fix}") from None


def path_exists(path: Path, what: str) -> bool:
    """``path.exists()``, where the OS refusing to look (a folder on the way the user may not enter, a name
    too long: pathlib raises those, PermissionError / OSError) is an AhnError naming ``what`` and the reason."""
    try:
        return path.exists()
    except OSError as e:
        raise AhnError(f"cannot read {what} {path}: {e.strerror or e}") from None


def check_weights_exist(path: Path, what: str = "weights") -> None:
    """AhnError (one line) when a weights path does not exist (or cannot be looked at)."""
    if not path_exists(path, what):
        raise AhnError(f"{what} not found: {path}; give a .safetensors file or a checkpoint folder")


def _weight_files(path: Path, what: str) -> list[Path]:
    check_weights_exist(path, what)
    if path.is_file():
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise AhnError(f"{path}: expected a .safetensors file or a checkpoint folder")
        files = [path]
    elif not path.is_dir():   # /dev/null, a pipe, a socket: not something weights can be read from
        raise AhnError(f"{what} {path} is neither a .safetensors file nor a checkpoint folder")
    else:
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            idx = load_json(index, "shard index")
            weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
            # a hand-edited or damaged index (a list, a weight_map of null or 3): a line, not a traceback
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n for n in weight_map.values()):
                raise AhnError(f"{index} is not a shard index (it needs a \"weight_map\" object of tensor name -> "
                               "shard file name); re-download or re-export it")
            names = sorted(set(weight_map.values()))
            if not names:
                raise AhnError(f"{index} lists no shards")
            files = [path / n for n in names]
            for f in files:
                if not f.exists():
                    raise AhnError(f"shard {f.name} listed in {index.name} is missing from {path}")
        elif single.exists():
            files = [single]
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) == 1:
                files = found
            else:
                pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
                hint = (f" (found pickle files {', '.join(pickles)}, which ahn_rt never loads)" if pickles else "")
                raise AhnError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}; give "
                               "a .safetensors file or the checkpoint folder that holds one")
    for f in files:
        check_safetensors(f)
    return files


def _metadata_config(files: list[Path]) -> dict | None:
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
        if "config" in meta:
            try:
                return json.loads(meta["config"])
            except json.JSONDecodeError:
                raise AhnError(f"{f}: the 'config' metadata is not valid JSON") from None
    return None


def find_config(path: Path, files: list[Path]) -> dict | None:
    """config.json beside the weights, else the safetensors metadata key 'config'."""
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if cfg_file.exists():
        return load_json(cfg_file, "config")
    return _metadata_config(files)


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------
class _Source:
    """key -> file, over several safetensors files; tensors are read lazily (memory-mapped)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            self.handles[f] = h
            for k in h.keys():
                if k in self.where:   # which copy counts would be the order of the files: refuse, not guess
                    raise AhnError(f"tensor {k} is stored twice, in {self.where[k]} and in {f}; a checkpoint holds "
                                   "each tensor once: remove the stale shard or re-export the checkpoint")
                self.where[k] = f

    def shape(self, key):
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def dtype(self, key) -> str:
        """The stored dtype, in safetensors' names ('BF16', 'I32', ...)."""
        return self.handles[self.where[key]].get_slice(key).get_dtype()

    def get(self, key) -> torch.Tensor:
        if key not in self.where:   # (the handler below looked it up again: a KeyError raised inside it)
            raise AhnError(f"the checkpoint has no tensor {key}")
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:  # corrupt data region
            raise AhnError(f"cannot read tensor {key} from {self.where[key]}: {str(e).splitlines()[0]}") from None


class _DictSource(_Source):
    """The same interface over tensors already in memory (the benchmark's random weights)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.where = {k: "<memory>" for k in tensors}

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key) -> str:
        t = self.tensors[key].dtype
        return _SAFETENSORS_NAMES.get(t, str(t))

    def get(self, key) -> torch.Tensor:
        return self.tensors[key]


def check_keys(expected: dict, src: _Source, keys: set, what: str, optional=()):
    """The strict check of a checkpoint's tensors (``keys`` of ``src``) against ``expected`` (name -> shape):
    no missing or unexpected name (but ``optional``), every shape, floating-point storage; AhnError naming
    ``what``. The loader's check, and the train command's before it writes anything."""
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected) - set(optional))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_short(unexpected)}")
    if problems:
        raise AhnError(f"{what} does not match the config: " + "; ".join(problems))
    for k, shape in expected.items():
        got = src.shape(k)
        if got != shape:
            raise AhnError(f"{what}: tensor {k} has shape {list(got)}, the config needs {list(shape)}")
        stored = src.dtype(k)
        if stored not in FLOAT_DTYPES:
            raise AhnError(f"{what}: tensor {k} is stored as {stored}, not as floating point (bf16, fp16, "
                           "float32 or float64); quantized checkpoints are not supported: give the unquantized weights")


def check_tensors(expected: dict, tensors: dict, what: str, optional=()):
    """``check_keys`` over tensors in memory ({name: tensor}: the trainer's base and AHN weights)."""
    check_keys(expected, _DictSource(tensors), set(tensors), what, optional)


def check_ahn_keys(config: Config, src: _Source, keys: set, what: str, implementation: str | None = None):
    """The strict check of the AHN tensors against ``implementation`` (default: the config's); when they fit
    another implementation exactly, the error says which (e.g. a config whose _ahn_implementation does not
    match its tensors)."""
    from . import memory
    impl = memory.resolve(implementation or config.ahn_implementation)
    try:
        check_keys(ahn_shapes(config, impl), src, keys, what)
    except AhnError as e:
        fits = [m for m in memory.NAMES if m != impl and set(ahn_shapes(config, m)) == keys]
        if fits:
            said = "asked for " if implementation else "the config says _ahn_implementation="
            raise AhnError(f"{e}; these tensors are an AHN-{fits[0]} memory but {said}{impl!r}") from None
        raise


def _short(keys, n=6):
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclasses.dataclass
class Checkpoint:
    """An opened checkpoint: its parsed config (architecture and AHN fields; the runtime choices are
    resolved by the caller, once) and where its tensors are. Nothing is read yet."""
    config: Config
    src: _Source
    ahn_src: _Source | None = None
    where: str = "<memory>"
    folder: Path | None = None

    @property
    def has_ahn(self) -> bool:
        return any(is_ahn_key(k) for k in self.src.where) or (
            self.ahn_src is not None and any(is_ahn_key(k) for k in self.ahn_src.where))

    @classmethod
    def from_tensors(cls, cfg: dict, tensors: dict) -> "Checkpoint":
        """Tensors already in memory under checkpoint names (the benchmark's random weights)."""
        return cls(parse_config(cfg, "<memory>"), _DictSource(tensors))


# Config fields that an AHN-only checkpoint's own config.json may set for the merged model.
_AHN_CONFIG_FIELDS = ("_ahn_implementation", "_layer_implementation", "sliding_window", "num_attn_sinks",
                      "use_q_proj", "use_ahn_router", "fa_layer_ids")


class AhnOnlyCheckpoint(AhnError):
    """An AHN-only checkpoint given where a base (or merged) one belongs; a command words the fix its way."""


class NoAhnTensors(AhnError):
    """A checkpoint without AHN tensors given where an AHN one belongs; a command words the fix its way."""


def open_checkpoint(weights, ahn=None) -> Checkpoint:
    """Locate the files and read the config of a base or merged checkpoint (+ an AHN checkpoint)."""
    path = Path(os.fspath(weights)).expanduser()
    files = _weight_files(path, "weights")
    src = _Source(files)
    if src.where and all(is_ahn_key(k) for k in src.where):
        raise AhnOnlyCheckpoint(f"{path} is an AHN-only checkpoint (it holds only model.layers.N.ahn.* tensors, "
                                f"no base model): give the base model with --weights and this one with --ahn")
    cfg = find_config(path, files)
    if cfg is None:
        raise AhnError(f"no config for {path}: put the model's config.json beside the weights "
                       "(or use a file written by ahn_rt, which embeds it)")
    config = parse_config(cfg, str(path))
    ahn_src = None
    if ahn is not None:
        apath = Path(os.fspath(ahn)).expanduser()
        afiles = _weight_files(apath, "AHN checkpoint")
        ahn_src = _Source(afiles)
        if not any(is_ahn_key(k) for k in ahn_src.where):
            raise NoAhnTensors(f"AHN checkpoint {apath} holds no AHN tensors (model.layers.N.ahn.fn.*); "
                           "pass a base model as --weights and its AHN weights as --ahn")
        ahn_cfg = find_config(apath, afiles) or {}
        # W, S and the AHN implementation may live in the AHN checkpoint's own config. The base config's
        # sliding_window is not W unless that config is an AHN one (then config.config_window has it): a plain
        # Qwen2.5 config's 32768 or 131072 became W when the AHN config named its variant but no window.
        base_cfg = {k: v for k, v in cfg.items() if k != "sliding_window"}
        a = parse_config({**base_cfg, **{k: v for k, v in ahn_cfg.items() if k in _AHN_CONFIG_FIELDS}}, str(apath))
        config = dataclasses.replace(config, ahn_implementation=a.ahn_implementation or "GatedDeltaNet",
                                     config_window=a.config_window or config.config_window,
                                     config_sinks=a.config_sinks if a.config_sinks is not None else config.config_sinks)
    folder = path if path.is_dir() else path.parent
    return Checkpoint(config, src, ahn_src, str(path), folder)


def load_weights(config: Config, ckpt: Checkpoint, device) -> Weights:
    """Strictly check and load every tensor the runtime ``config`` needs, converted to config.dtype on
    ``device``. AHN tensors come from the AHN checkpoint when one is given (a merged checkpoint given
    there contributes only its AHN tensors), else from the main checkpoint."""
    src, ahn_src, where = ckpt.src, ckpt.ahn_src, ckpt.where
    base_keys = {k for k in src.where}
    merged_ahn = {k for k in base_keys if is_ahn_key(k)}
    base_keys -= merged_ahn
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    check_keys(base_shapes(config), src, base_keys, f"checkpoint {where}", optional=optional)
    ahn_keys, ahn_from, ahn_where = merged_ahn, src, f"checkpoint {where}"
    if ahn_src is not None:
        if merged_ahn:
            raise AhnError(f"{where} already holds AHN weights; drop --ahn or use the base checkpoint")
        ahn_keys, ahn_from = {k for k in ahn_src.where if is_ahn_key(k)}, ahn_src
        ahn_where = f"AHN checkpoint {sorted(set(map(str, ahn_src.where.values())))[0]}"
    if ahn_keys:
        check_ahn_keys(config, ahn_from, ahn_keys, ahn_where)

    dt = config.dtype
    mem = None
    if config.mode == "ahn":
        from . import memory
        mem = memory.get(config.ahn_implementation)

    def get(k, s=src, dtype=dt):
        return s.get(k).to(device=device, dtype=dtype)

    layers = []
    for n in range(config.num_layers):
        f = fuse_layer(config, n, get)
        lw = LayerWeights(ln_in=f["ln_in"], w_in=f["w_qkv"], b_in=f.get("b_qkv"), q_norm=f.get("q_norm"),
                          k_norm=f.get("k_norm"), w_o=f["w_o"], b_o=f.get("b_o"), ln_post=f["ln_post"],
                          w_gu=f["w_gu"], w_down=f["w_down"])
        if mem is not None:   # the memory's projection rows join q | k | v in the one input GEMM
            rows, rows_bias, lw.mem = mem.load(config, lambda name, n=n: get(ahn_key(n, name), ahn_from))
            if rows_bias is not None or lw.b_in is not None:   # a bias on one side: zeros on the other
                lw.b_in = torch.cat([lw.b_in if lw.b_in is not None else
                                     torch.zeros(lw.w_in.shape[0], dtype=dt, device=device),
                                     rows_bias if rows_bias is not None else
                                     torch.zeros(rows.shape[0], dtype=dt, device=device)])
            lw.w_in = torch.cat([lw.w_in, rows])
        layers.append(lw)
    embed = get("model.embed_tokens.weight")
    head = embed if config.tie_word_embeddings else get("lm_head.weight")
    return Weights(embed=embed, norm=get("model.norm.weight"), lm_head=head, layers=layers)
