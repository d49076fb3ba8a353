"""Random-initialized checkpoints in the real format, for running and benchmarking without a download.

    python -m ahn_rt.init_weights --preset tiny --ahn gdn --out weights/tiny.safetensors --tokenizer qwen2.5

writes one .safetensors file with Hugging Face key names (and the official AHN key names with --ahn gdn),
the config embedded in its metadata (key "config"), and with --tokenizer qwen2.5 a real Qwen2.5
tokenizer.json beside it. The AHN o_proj is random, not zero, so the memory is exercised.
``random_state_dict`` also serves the benchmark, which builds weights directly on the GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from .config import parse_config, parse_dtype
from .errors import AhnError

QWEN_VOCAB = 151936
PRESETS = {
    # a small model that still uses the real Qwen vocabulary, so it works with the real tokenizer
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=QWEN_VOCAB,
                 tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    # public shapes of the Qwen releases (AHN_SPEC §1, PERF.md)
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=QWEN_VOCAB,
                         tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=QWEN_VOCAB,
                       tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=QWEN_VOCAB,
                       tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
                       attention_bias=False),
}
QWEN_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>


def preset_config(preset: str, ahn: bool, dtype: torch.dtype) -> dict:
    if preset not in PRESETS:
        raise AhnError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg.update(architectures=["Qwen3ForCausalLM" if cfg["model_type"] == "qwen3" else "Qwen2ForCausalLM"],
               hidden_act="silu", rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=QWEN_EOS,
               torch_dtype=str(dtype).replace("torch.", ""))
    if ahn:
        cfg.update(_ahn_implementation="GatedDeltaNet",
                   _layer_implementation=("Qwen3" if cfg["model_type"] == "qwen3" else "Qwen2") + "MemDecoderLayer",
                   sliding_window=32640, num_attn_sinks=128, use_sliding_window=False, fa_layer_ids="",
                   use_ahn_router=False, use_q_proj=False)
    return cfg


def random_state_dict(cfg: dict, *, seed: int = 0, dtype=torch.bfloat16, device="cpu", ahn: bool = True,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors under the Hugging Face / official AHN key names for a config dict."""
    c = parse_config(cfg, "preset")
    g = torch.Generator(device=device).manual_seed(seed)
    d, i, H, D = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim

    def normal(*shape, s=std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s).to(dtype)

    def ones_ish(n):
        return (1.0 + torch.randn(n, generator=g, device=device) * 0.05).to(dtype)

    sd = {"model.embed_tokens.weight": normal(c.vocab_size, d), "model.norm.weight": ones_ish(d)}
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = normal(c.vocab_size, d)
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        sd.update({
            p + "input_layernorm.weight": ones_ish(d), p + "post_attention_layernorm.weight": ones_ish(d),
            p + "self_attn.q_proj.weight": normal(c.q_size, d), p + "self_attn.k_proj.weight": normal(c.kv_size, d),
            p + "self_attn.v_proj.weight": normal(c.kv_size, d), p + "self_attn.o_proj.weight": normal(d, c.q_size),
            p + "mlp.gate_proj.weight": normal(i, d), p + "mlp.up_proj.weight": normal(i, d),
            p + "mlp.down_proj.weight": normal(d, i),
        })
        if c.attention_bias:
            for x, size in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
                sd[p + f"self_attn.{x}_proj.bias"] = normal(size, s=0.1)
        if c.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = ones_ish(D)
            sd[p + "self_attn.k_norm.weight"] = ones_ish(D)
        if ahn:
            a = p + "ahn.fn."
            # Initial values as the official GatedDeltaNet constructor draws them (AHN_SPEC §2.4).
            dt = torch.exp(torch.rand(H, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3)).clamp(min=1e-4)
            sd.update({
                a + "A_log": torch.log(torch.rand(H, generator=g, device=device) * 15 + 1).to(dtype),
                a + "D": torch.ones(H, device=device, dtype=dtype),
                a + "dt_bias": (dt + torch.log(-torch.expm1(-dt))).to(dtype),
                a + "a_proj.weight": normal(H, d), a + "b_proj.weight": normal(H, d),
                a + "g_proj.weight": normal(H, d),
                a + "o_norm.weight": ones_ish(D),
                # random, not zero (the official training init), so the memory path is exercised
                a + "o_proj.weight": normal(H, D, D, s=D ** -0.5),
            })
    return sd


def write_checkpoint(out: Path, sd: dict, cfg: dict):
    """Write atomically: a temporary file renamed into place, so nothing is ever half-written."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={"format": "pt", "config": json.dumps(cfg)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ahn_rt.init_weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--ahn", choices=["gdn", "none"], default="none", help="add AHN GatedDeltaNet weights")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tokenizer", choices=["qwen2.5", "none"], default="none",
                    help="also write the real Qwen2.5 tokenizer.json beside the weights")
    args = ap.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise AhnError(f"--out must end in .safetensors, got {out}")
        dtype = parse_dtype(args.dtype)
        ahn = args.ahn == "gdn"
        cfg = preset_config(args.preset, ahn, dtype)
        if args.tokenizer == "qwen2.5":
            from .tokenizer_build import write_qwen25_tokenizer
            write_qwen25_tokenizer(out.parent)
            with open(out.parent / "generation_config.json", "w") as f:
                json.dump({"eos_token_id": QWEN_EOS, "bos_token_id": 151643}, f)
        write_checkpoint(out, random_state_dict(cfg, seed=args.seed, dtype=dtype, ahn=ahn), cfg)
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (f" and {out.parent / 'tokenizer.json'}" if args.tokenizer == "qwen2.5" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
