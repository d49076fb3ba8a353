"""Tiny random checkpoints for the model-level tests, built WITHOUT ahn_rt: base Qwen2/Qwen3 via transformers
save_pretrained (single file or sharded), AHN-only safetensors with the official key names
(model.layers.N.ahn.fn.*, docs/semantics.md §8, §11) of each memory variant (GatedDeltaNet, DeltaNet,
Mamba2), and merged base+AHN folders. Everything is float32 and
seeded. No tolerances live here (the scales below shape random weights; each test file's table bounds errors).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from oracle import read_tensors

AHN_CFG = {"_layer_implementation": None, "_ahn_implementation": "GatedDeltaNet", "fa_layer_ids": "",
           "use_ahn_router": False, "use_q_proj": False}


@dataclass(frozen=True)
class Spec:
    """Shape of a tiny base model. Qwen3 gets head_dim != hidden/heads on purpose."""
    family: str = "qwen2"                # "qwen2" | "qwen3"
    tied: bool = False
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: Optional[int] = None       # None: hidden // heads (qwen2); qwen3 default 24
    vocab: int = 251
    inter: int = 96
    rope_theta: float = 1000.0           # non-default, so a runtime that ignores it is caught
    attention_bias: bool = False         # qwen3 only (qwen2 always has q/k/v bias)
    seed: int = 0

    @property
    def D(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return 24 if self.family == "qwen3" else self.hidden // self.heads

    @property
    def id(self) -> str:
        s = f"{self.family}-{'tied' if self.tied else 'untied'}"
        return s + ("-bias" if self.family == "qwen3" and self.attention_bias else "")


def _hf_model(spec: Spec):
    import transformers  # test-only dependency
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.kv_heads, tie_word_embeddings=spec.tied, rms_norm_eps=1e-6,
                  max_position_embeddings=4096, use_sliding_window=False, initializer_range=0.05)
    try:
        rope = dict(rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta})
        if spec.family == "qwen2":
            cfg = transformers.Qwen2Config(**common, **rope)
        else:
            cfg = transformers.Qwen3Config(**common, **rope, head_dim=spec.D, attention_bias=spec.attention_bias)
    except TypeError:  # older transformers
        rope = dict(rope_theta=spec.rope_theta)
        if spec.family == "qwen2":
            cfg = transformers.Qwen2Config(**common, **rope)
        else:
            cfg = transformers.Qwen3Config(**common, **rope, head_dim=spec.D, attention_bias=spec.attention_bias)
    torch.manual_seed(spec.seed)
    cls = transformers.Qwen2ForCausalLM if spec.family == "qwen2" else transformers.Qwen3ForCausalLM
    model = cls(cfg).to(torch.float32).eval()
    # Make every parameter random and O(1)-ish so biases, norm weights and heads all matter.
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def save_base(spec: Spec, folder: str, shard: bool = False) -> str:
    """save_pretrained a random base model; shard=True forces several shards + index.json."""
    model = _hf_model(spec)
    kw = {"max_shard_size": "60KB"} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kw) if _accepts_safe() else \
        model.save_pretrained(folder, **kw)
    if shard:
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json")), os.listdir(folder)
    return folder


def _accepts_safe() -> bool:
    import inspect
    from transformers import PreTrainedModel
    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def hf_model(folder: str):
    """Reload a saved folder with transformers (float32, eager attention) for the comparison tests."""
    import transformers
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cls = transformers.Qwen2ForCausalLM if cfg["model_type"] == "qwen2" else transformers.Qwen3ForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


IMPLS = ("GatedDeltaNet", "DeltaNet", "Mamba2")


def ahn_tensors(cfg: dict, seed: int = 0, o_proj_scale: float = 1.0, zero_o_proj: bool = False,
                impl: str = "GatedDeltaNet") -> Dict[str, torch.Tensor]:
    """Random AHN tensors of memory ``impl`` with the official names; shapes per docs/semantics.md §8, §11."""
    if impl == "DeltaNet":
        return _dn_tensors(cfg, seed, o_proj_scale, zero_o_proj)
    if impl == "Mamba2":
        return _mamba2_tensors(cfg, seed, o_proj_scale, zero_o_proj)
    assert impl == "GatedDeltaNet", impl
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D = cfg.get("head_dim") or d // H
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for l in range(L):
        p = f"model.layers.{l}.ahn.fn."
        u = 1e-3 + (0.1 - 1e-3) * torch.rand(H, generator=g)
        out[p + "A_log"] = torch.log(1.0 + 15.0 * torch.rand(H, generator=g))          # log U(1, 16)
        out[p + "D"] = torch.ones(H)
        out[p + "dt_bias"] = u + torch.log(-torch.expm1(-u))                             # softplus^-1(u)
        out[p + "a_proj.weight"] = 0.05 * torch.randn(H, d, generator=g)
        out[p + "b_proj.weight"] = 0.1 * torch.randn(H, d, generator=g)
        out[p + "g_proj.weight"] = 0.1 * torch.randn(H, d, generator=g)
        out[p + "o_norm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=g)
        wo = o_proj_scale * torch.randn(H, D, D, generator=g) / math.sqrt(D)               # [H, D_in, D_out]
        out[p + "o_proj.weight"] = torch.zeros_like(wo) if zero_o_proj else wo
    return {k: v.contiguous().to(torch.float32) for k, v in out.items()}


def _dn_tensors(cfg, seed, o_proj_scale, zero_o_proj):
    """DeltaNet: b_proj, g_proj, o_norm, o_proj (no decay parameters)."""
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D = cfg.get("head_dim") or d // H
    g = torch.Generator().manual_seed(2000 + seed)
    out = {}
    for l in range(L):
        p = f"model.layers.{l}.ahn.fn."
        out[p + "b_proj.weight"] = 0.1 * torch.randn(H, d, generator=g)
        out[p + "g_proj.weight"] = 0.1 * torch.randn(H, d, generator=g)
        out[p + "o_norm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=g)
        wo = o_proj_scale * torch.randn(H, D, D, generator=g) / math.sqrt(D)
        out[p + "o_proj.weight"] = torch.zeros_like(wo) if zero_o_proj else wo
    return {k: v.contiguous().to(torch.float32) for k, v in out.items()}


def _mamba2_tensors(cfg, seed, o_proj_scale, zero_o_proj):
    """Mamba2: dt_bias, A_log, norm [H*D], dt_proj (+bias), g_proj (+bias), o_proj. Steps dt = softplus(.)
    around 0.01 .. 0.5 and A in -(1 .. 4): per-step decays between ~0.99 and ~0.15."""
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D = cfg.get("head_dim") or d // H
    g = torch.Generator().manual_seed(3000 + seed)
    out = {}
    for l in range(L):
        p = f"model.layers.{l}.ahn.fn."
        u = 0.01 + 0.3 * torch.rand(H, generator=g)
        out[p + "dt_bias"] = u + torch.log(-torch.expm1(-u))                             # softplus^-1(u)
        out[p + "A_log"] = torch.log(1.0 + 3.0 * torch.rand(H, generator=g))
        out[p + "norm.weight"] = 1.0 + 0.1 * torch.randn(H * D, generator=g)
        out[p + "dt_proj.weight"] = 0.05 * torch.randn(H, d, generator=g)
        out[p + "dt_proj.bias"] = 0.1 * torch.randn(H, generator=g)
        out[p + "g_proj.weight"] = 0.1 * torch.randn(H, d, generator=g)
        out[p + "g_proj.bias"] = 0.2 * torch.randn(H, generator=g)
        wo = o_proj_scale * torch.randn(H, D, D, generator=g) / math.sqrt(D)
        out[p + "o_proj.weight"] = torch.zeros_like(wo) if zero_o_proj else wo
    return {k: v.contiguous().to(torch.float32) for k, v in out.items()}


def ahn_config(base_cfg: dict, window: int, sinks: int, **extra) -> dict:
    cfg = dict(base_cfg)
    cfg.update(AHN_CFG)
    cfg["_layer_implementation"] = "Qwen3MemDecoderLayer" if cfg["model_type"] == "qwen3" else "Qwen2MemDecoderLayer"
    cfg["sliding_window"] = window
    cfg["num_attn_sinks"] = sinks
    cfg.update(extra)
    return cfg


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_ahn_only(base_folder: str, folder: str, window: int, sinks: int, seed: int = 0,
                  zero_o_proj: bool = False, o_proj_scale: float = 1.0, impl: str = "GatedDeltaNet",
                  **cfg_extra) -> str:
    """AHN-only checkpoint folder: config.json + model.safetensors holding only model.layers.N.ahn.fn.*
    (memory ``impl``; the config says so unless cfg_extra overrides _ahn_implementation)."""
    base_cfg = json.load(open(os.path.join(base_folder, "config.json")))
    os.makedirs(folder, exist_ok=True)
    save_file(ahn_tensors(base_cfg, seed, o_proj_scale, zero_o_proj, impl), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    write_json(os.path.join(folder, "config.json"),
               ahn_config(base_cfg, window, sinks, **{"_ahn_implementation": impl, **cfg_extra}))
    return folder


def save_merged(base_folder: str, ahn_folder: str, folder: str) -> str:
    """Base + AHN keys in one model.safetensors, config from the AHN checkpoint (like merge_weights.py)."""
    os.makedirs(folder, exist_ok=True)
    sd = read_tensors(base_folder)
    sd.update(read_tensors(ahn_folder))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    write_json(os.path.join(folder, "config.json"), json.load(open(os.path.join(ahn_folder, "config.json"))))
    return folder


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


# ----------------------------------------------------------------------------------------------- caching
# Checkpoints are built once per test process (in a temp dir removed at exit); building is ~50 ms each.
import atexit
import functools
import shutil
import tempfile

_ROOT = tempfile.mkdtemp(prefix="ahn_ckpt_")
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def base(spec: Spec, shard: bool = False) -> str:
    return save_base(spec, os.path.join(_ROOT, f"base-{spec.id}-s{spec.seed}-{'sharded' if shard else 'single'}"),
                     shard=shard)


@functools.lru_cache(maxsize=None)
def ahn_only(spec: Spec, window: int, sinks: int, zero_o_proj: bool = False, seed: int = 0,
             impl: str = "GatedDeltaNet") -> str:
    name = f"ahn-{impl}-{spec.id}-s{spec.seed}-W{window}-S{sinks}-{'zero' if zero_o_proj else 'rand'}-{seed}"
    return save_ahn_only(base(spec), os.path.join(_ROOT, name), window, sinks, seed=seed, zero_o_proj=zero_o_proj,
                         impl=impl)


@functools.lru_cache(maxsize=None)
def merged(spec: Spec, window: int, sinks: int, zero_o_proj: bool = False, seed: int = 0,
           impl: str = "GatedDeltaNet") -> str:
    name = f"merged-{impl}-{spec.id}-s{spec.seed}-W{window}-S{sinks}-{'zero' if zero_o_proj else 'rand'}-{seed}"
    return save_merged(base(spec), ahn_only(spec, window, sinks, zero_o_proj, seed, impl), os.path.join(_ROOT, name))


def scratch(name: str) -> str:
    """A fresh empty folder for tests that write broken checkpoints."""
    path = tempfile.mkdtemp(prefix=name + "-", dir=_ROOT)
    return path


def run_feeds(model, ids: torch.Tensor, feeds=None) -> torch.Tensor:
    """New session; feed ids in pieces of the given sizes (None: all at once); concatenated logits [T, V]."""
    sess = model.new_session()
    if feeds is None:
        feeds = [len(ids)]
    assert sum(feeds) == len(ids), (feeds, len(ids))
    outs, pos = [], 0
    for n in feeds:
        out = sess.forward(ids[pos:pos + n])
        assert tuple(out.shape) == (n, out.shape[-1]), (tuple(out.shape), n)
        outs.append(out)
        pos += n
        assert sess.position == pos, (sess.position, pos)
    return torch.cat(outs)
