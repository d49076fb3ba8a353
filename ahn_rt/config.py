"""Model configuration: the architecture read from a Hugging Face config.json, plus the runtime choices
(window, sinks, mode, dtype) resolved and validated in one place."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re

import torch

from .errors import AhnError

# docs/semantics.md §8: without explicit values the runtime uses S + W = 32768 lossless tokens.
DEFAULT_WINDOW = 32640
DEFAULT_SINKS = 128
# The most cache slots (sinks + window) a state may have: 2**31 - 1. Each slot holds a key and a value in every
# layer: 12 KiB a slot for the smallest Qwen (2.5-0.5B, bf16), so 24 TiB at this size. A larger S + W is a
# mistake that fits on no device, refused where it is given (load; the train CLI's --infer-window, before it is
# written into config.json) rather than at the first session's allocation.
MAX_CACHE_SLOTS = 2**31 - 1
from .cli import MODES  # noqa: E402 - the one spelling, in the module that needs no torch
# docs/semantics.md §6, §11: the memory's output norm (GatedDeltaNet, DeltaNet: FusedRMSNormSwishGate;
# Mamba2: RMSNormGated) uses eps 1e-5.
AHN_NORM_EPS = 1e-5

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _dtype_name(dtype) -> str:
    return str(dtype).lower().replace("torch.", "")


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype or one of the names above (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise AhnError(f"dtype {dtype} is not supported; use bf16, fp16 or float32")
        return dtype
    name = _dtype_name(dtype)
    if name not in _DTYPES:
        raise AhnError(f"unknown dtype {dtype!r}; use one of bf16, fp16, float32")
    return _DTYPES[name]


@dataclasses.dataclass
class Config:
    # architecture (from config.json)
    family: str                      # "qwen2" (Qwen2/Qwen2.5) or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    stored_dtype: torch.dtype | None   # the default compute dtype; None: torch_dtype names none that runs here
    eos_token_ids: tuple[int, ...]
    # AHN fields of the config (None when the config is not an AHN one)
    ahn_implementation: str | None = None
    config_window: int | None = None
    config_sinks: int | None = None
    # runtime choices (resolved by ahn_rt.load)
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    mode: str = "full"
    dtype: torch.dtype = torch.float32
    # why stored_dtype is None (the config's torch_dtype as written, for the message when no dtype is given)
    stored_dtype_note: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


_KIND_NAMES = {int: "an integer", float: "a number"}


def _convert(value, key: str, where: str, kind=int):
    """kind(value), or AhnError naming the config field (a hand-edited config.json: "rope_theta": "1e6x"). A
    bool is no number, and an integer field takes no fraction (int() made true 1 and 100.7 100)."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise AhnError(f"{where}: config field '{key}' = {value!r} is not {_KIND_NAMES[kind]}; "
                       "fix it in config.json") from None


def _get(cfg: dict, key: str, where: str, kind=int):
    if key not in cfg or cfg[key] is None:
        raise AhnError(f"{where}: config is missing '{key}'")
    value = _convert(cfg[key], key, where, kind)
    if kind is int and value < 1:
        raise AhnError(f"{where}: config field '{key}' must be >= 1, got {value}")
    return value


def _opt(cfg: dict, key: str, where: str, default, kind=int):
    """An optional field: kind(cfg[key]) when it is set (not None, 0 or empty), else ``default``."""
    value = cfg.get(key)
    return _convert(value, key, where, kind) if value else default


def _flag(cfg: dict, key: str, where: str, default: bool = False) -> bool:
    """A true / false field (0 / 1 too); absent or null: ``default``. Anything else is AhnError naming the field:
    bool() read the string "false" as true (an untied model ran with its embedding as the LM head)."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise AhnError(f"{where}: config field '{key}' = {value!r:.40} is not true or false; fix it in config.json")


def _mapping(cfg: dict, key: str, where: str) -> dict:
    """An optional object field (rope_parameters, rope_scaling): {} when absent."""
    value = cfg.get(key)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AhnError(f"{where}: config field '{key}' = {value!r} is not a JSON object; fix it in config.json")
    return value


def parse_config(cfg: dict, where: str) -> Config:
    """Validate a Hugging Face config dict of a Qwen2/Qwen2.5/Qwen3 model (with or without AHN)."""
    if not isinstance(cfg, dict):
        raise AhnError(f"{where}: config is not a JSON object")
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or []
    arch = " ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, (list, tuple)) else str(archs)
    # the architectures name the family only where model_type is absent, and only as Qwen2For... / Qwen3For...:
    # qwen2_moe, qwen3_moe, qwen2_vl (Qwen2MoeForCausalLM, ...) are other models, refused here by name (they
    # were read as Qwen2 / Qwen3 and refused by a key or shape check listing tensors)
    named = re.search(r"\bQwen([23])For", arch) if not model_type else None
    if model_type in ("qwen2", "qwen3"):
        family = model_type
    elif named:
        family = "qwen" + named.group(1)
    else:
        raise AhnError(f"{where}: model_type {model_type or arch or '?'!r} is not supported "
                       "(ahn_rt runs Qwen2, Qwen2.5 and Qwen3 models)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise AhnError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    hidden = _get(cfg, "hidden_size", where)
    heads = _get(cfg, "num_attention_heads", where)
    kv_heads = _opt(cfg, "num_key_value_heads", where, heads)
    if kv_heads < 1 or heads % kv_heads:
        raise AhnError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    # when the config has none: transformers' Qwen3Config defaults to 128 (its attention reads that, not
    # hidden / heads); Qwen2's attention computes hidden / heads
    head_dim = _opt(cfg, "head_dim", where, 128 if family == "qwen3" else hidden // heads)
    if head_dim % 2:
        raise AhnError(f"{where}: head_dim {head_dim} must be even for RoPE")
    # transformers >= 5 nests RoPE settings under rope_parameters; older configs use rope_theta.
    rope = _mapping(cfg, "rope_parameters", where)
    scaling = _mapping(cfg, "rope_scaling", where)
    rope_type = (rope.get("rope_type") or rope.get("type") or "default") if rope else "default"
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type != "default":
        raise AhnError(f"{where}: rope scaling {rope_type!r} is not supported (only default RoPE)")
    # only an absent (or null) rope_theta takes the default: 0 is refused below (it became 10000)
    theta = next((v for v in (cfg.get("rope_theta"), rope.get("rope_theta")) if v is not None), 10000.0)
    theta = _convert(theta, "rope_theta", where, float)
    eps = _convert(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", where, float)
    # a number, but one that turns every logit into NaN (a negative base or epsilon) or is no setting at all
    for key, value, ok, need in (("rope_theta", theta, theta > 0, "> 0"), ("rms_norm_eps", eps, eps >= 0, ">= 0")):
        if not (math.isfinite(value) and ok):
            raise AhnError(f"{where}: config field '{key}' = {value!r} must be a finite number {need}; "
                           "fix it in config.json")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    eos_ids = tuple(_convert(e, "eos_token_id", where) for e in eos_ids)
    # the dtype the weights were saved in is the default compute dtype; float64 (which the loader accepts and
    # casts) runs in float32, the most precise dtype here; any other name is refused when no dtype is given
    # (it ran in bf16 silently)
    field = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"
    stored = cfg.get(field) or "bfloat16"
    stored_note = ""
    try:
        stored_dtype = torch.float32 if _dtype_name(stored) in ("float64", "double") else parse_dtype(stored)
    except AhnError:
        stored_dtype = None
        stored_note = (f"{where}: config field '{field}' = {stored!r} names no dtype ahn_rt runs; pass a dtype "
                       "(--dtype bf16, fp16 or float32) or fix the field in config.json")
    ahn_impl = cfg.get("_ahn_implementation")
    if ahn_impl is None and str(cfg.get("_layer_implementation") or "").endswith("MemDecoderLayer"):
        ahn_impl = "GatedDeltaNet"
    if ahn_impl is not None:
        from . import memory   # here, not at the top: the memory modules import the ops, which import this
        if ahn_impl not in memory.NAMES:
            raise AhnError(f"{where}: AHN implementation {ahn_impl!r} is not supported (supported: "
                           f"{', '.join(memory.NAMES)})")
        for flag in ("use_q_proj", "use_ahn_router"):
            if _flag(cfg, flag, where):
                raise AhnError(f"{where}: {flag}=true is not supported (the official inference code "
                               "cannot run it either, docs/semantics.md §9)")
        if str(cfg.get("fa_layer_ids") or "").strip():
            raise AhnError(f"{where}: fa_layer_ids={cfg['fa_layer_ids']!r} is not supported "
                           "(AHN in every layer only, docs/semantics.md §9)")
    is_ahn_cfg = ahn_impl is not None or "num_attn_sinks" in cfg
    # W and S as the config gives them (null: not given); 0 as W was the default window, silently
    window = cfg.get("sliding_window") if is_ahn_cfg else None
    window = _convert(window, "sliding_window", where) if window is not None else None
    sinks = _convert(cfg["num_attn_sinks"], "num_attn_sinks", where) if cfg.get("num_attn_sinks") is not None else None
    for key, value, least in (("sliding_window", window, 1), ("num_attn_sinks", sinks, 0)):
        if value is not None and value < least:
            raise AhnError(f"{where}: config field '{key}' must be >= {least}, got {value}; fix it in config.json")
    num_layers = _get(cfg, "num_hidden_layers", where)
    if not is_ahn_cfg:   # (an AHN config's sliding_window is the AHN window W, docs/semantics.md §8)
        _refuse_sliding_layers(cfg, where, num_layers)
    return Config(
        family=family, vocab_size=_get(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size", where),
        num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rope_theta=theta,
        rms_norm_eps=eps,
        tie_word_embeddings=_flag(cfg, "tie_word_embeddings", where),
        attention_bias=_flag(cfg, "attention_bias", where) if family == "qwen3" else True,
        qk_norm=family == "qwen3",
        max_position_embeddings=_opt(cfg, "max_position_embeddings", where, 32768),
        stored_dtype=stored_dtype, eos_token_ids=eos_ids, stored_dtype_note=stored_note,
        ahn_implementation=ahn_impl,
        config_window=window, config_sinks=sinks,
    )


def _refuse_sliding_layers(cfg: dict, where: str, num_layers: int):
    """AhnError when a plain Qwen config makes some layer attend through a sliding window, as transformers
    reads it: ``use_sliding_window`` true with a ``sliding_window``, and that layer's ``layer_types`` entry
    "sliding_attention" (without ``layer_types``: the layers from ``max_window_layers`` on, default 28).
    ahn_rt runs every layer of such a model with full attention: past the window, another model."""
    window = cfg.get("sliding_window")
    if not _flag(cfg, "use_sliding_window", where) or window is None:
        return
    types = cfg.get("layer_types")
    if isinstance(types, (list, tuple)):
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    else:
        first = _convert(cfg.get("max_window_layers", 28), "max_window_layers", where)
        sliding = list(range(max(first, 0), num_layers))
    if sliding:
        raise AhnError(f"{where}: use_sliding_window=true gives {len(sliding)} of the {num_layers} layers (from "
                       f"layer {sliding[0]}) a sliding window of {window} tokens, which ahn_rt does not run (it "
                       "would attend over every token there); if the model was trained with full attention, set "
                       "use_sliding_window to false in config.json")


def load_json(path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AhnError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise AhnError(f"{what} {path} is a folder, not a JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AhnError(f"{what} {path} is not valid JSON ({str(e).splitlines()[0]})") from None


def resolve_runtime(config: Config, *, window, sinks, mode, dtype, has_ahn: bool) -> Config:
    """Fill the runtime fields: explicit arguments, else the config's AHN fields, else defaults."""
    if mode is None:
        mode = "ahn" if has_ahn else "full"
    if mode not in MODES:
        raise AhnError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "ahn" and not has_ahn:
        raise AhnError("mode 'ahn' needs AHN weights: pass --ahn PATH (ahn=...) or a merged checkpoint, "
                       "or use mode 'swa' / 'full'")
    for name, v in (("window", window), ("sinks", sinks)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise AhnError(f"{name} must be an integer, got {v!r}")
    # how a message names them: the argument, else the config field, else the default
    names = tuple(arg if v is not None else f"the config's {field}" if in_config else f"the default {arg}"
                  for v, arg, field, in_config in ((window, "window", "sliding_window", config.config_window),
                                                   (sinks, "sinks", "num_attn_sinks", config.config_sinks is not None)))
    hints = tuple(f" ({'' if v is not None else 'or override it with '}--{arg})"
                  for v, arg in ((window, "window"), (sinks, "sinks")))
    if window is None:
        window = config.config_window or DEFAULT_WINDOW
    if sinks is None:
        sinks = config.config_sinks if config.config_sinks is not None else DEFAULT_SINKS
    window, sinks = int(window), int(sinks)
    if window < 1:
        raise AhnError(f"window must be >= 1, got {window}")
    if sinks < 0:
        raise AhnError(f"sinks must be >= 0, got {sinks}")
    if mode != "full":       # full attention keeps every token: the window and sinks are not used
        check_cache_slots(window, sinks, names, hints)
    dtype = parse_dtype(dtype) or config.stored_dtype
    if dtype is None:
        raise AhnError(config.stored_dtype_note)
    return dataclasses.replace(config, window=window, sinks=sinks, mode=mode, dtype=dtype)


def check_cache_slots(window: int, sinks: int, names=("window", "sinks"), hints=("", "")):
    """AhnError unless sinks + window is at most MAX_CACHE_SLOTS: the loader's rule, which the train CLI applies
    to the sliding_window / num_attn_sinks it writes. ``names``: what the message calls the window and the
    sinks; ``hints``: how to lower each (appended to "lower <name>")."""
    if window + sinks > MAX_CACHE_SLOTS:
        k = 0 if window >= sinks else 1
        lower = names[k] if names[k].startswith(("-", "the ")) else "the " + names[k]
        raise AhnError(f"{names[1]} {sinks} + {names[0]} {window} = {sinks + window} cache slots, more than a "
                       f"state can hold (at most {MAX_CACHE_SLOTS} = 2**31 - 1; each slot keeps a key and a value in "
                       f"every layer); lower {lower}{hints[k]}")


def rope_inv_freq(config: Config, device) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/D) in float32, as Hugging Face computes it (docs/semantics.md §1)."""
    d = config.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d
    return (1.0 / (config.rope_theta ** exponent)).to(device)


def param_count(config: Config) -> int:
    d, i = config.hidden_size, config.intermediate_size
    attn = d * (config.q_size + 2 * config.kv_size) + config.q_size * d
    per_layer = attn + 3 * d * i + 2 * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.num_layers * per_layer + config.vocab_size * d + head + d
