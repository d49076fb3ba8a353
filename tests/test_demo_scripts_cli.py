"""The scripts of scripts/demo follow the rule of every ahn_rt command: bad input is one line on stderr,
"error: ...", exit 2, no traceback, found before any work and with nothing written; valid input still runs.
Each case below ended in a traceback, ran silently with exit 0, or printed argparse's whole usage block."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo"
DATA = ROOT / "data" / "demo"
MODEL = ROOT / "weights" / "demo"
TIMEOUT_S = 300

WORK = {}   # the scripts' working folder (their defaults: data/demo, weights/demo), set by the fixture below


@pytest.fixture(scope="module", autouse=True)
def demo_cwd(tmp_path_factory):
    """A folder whose data/demo is the checkout's corpus, or one built here by build_corpus.py (a clean clone
    has none: about 15 s on 2 cores), and whose weights/ is the checkout's: the scripts run in it."""
    work = tmp_path_factory.mktemp("demo_cwd")
    (work / "weights").symlink_to(ROOT / "weights")
    (work / "data").mkdir()
    if (DATA / "heldout.bin").exists():
        (work / "data" / "demo").symlink_to(DATA)
    else:
        r = subprocess.run([sys.executable, str(DEMO / "build_corpus.py"), "--out", str(work / "data" / "demo")],
                           cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
        assert r.returncode == 0, r.stderr[-2000:]
    WORK["cwd"] = work
    yield work
    WORK.clear()

SMALL_EVAL = ("--seq-len", "256", "--n-text", "1", "--n-passkey", "1", "--distances", "100", "--edges", "100",
              "--device", "cpu")


def run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DEMO / f"{script}.py"), *map(str, args)], cwd=WORK["cwd"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def refused(r, says=""):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and says in lines[0], r.stderr[-2000:]


def linked_corpus(tmp_path, but=None):
    """tmp_path/data: a link to each file of the corpus (all but ``but``), so that a test may write there."""
    data = tmp_path / "data"
    data.mkdir()
    for f in (WORK["cwd"] / "data" / "demo").iterdir():
        if f.name != but:
            (data / f.name).symlink_to(f.resolve())
    return data


@pytest.fixture
def a_file(tmp_path):
    """A plain file: an output path below it cannot be written."""
    p = tmp_path / "a_file"
    p.write_text("x")
    return p


@pytest.mark.parametrize("args, says", [
    (("--distance", "-5"), "--distance"),
    (("--distance", "abc"), "--distance"),
    (("--distance", "3"), "--distance"),
    (("--key-pos", "2"), "--key-pos"),
    (("--seed", "-1"), "--seed"),
    (("--tokenizer", "/nonexistent/tokenizer.json"), "--tokenizer"),
    (("--tokenizer", "README.md"), "--tokenizer"),
])
def test_make_prompt_refuses(args, says):
    refused(run("make_prompt", *args), says)


def test_make_prompt_still_writes_its_prompt():
    r = run("make_prompt", "--distance", "500", "--seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# passkey: " in r.stdout and r.stdout.endswith("# the passkey was: ") and "distance 500" in r.stderr


@pytest.mark.parametrize("args, says", [
    (("--seeds", "-1"), "--seeds"),
    (("--seeds", "0"), "--seeds"),
    (("--distance", "5"), "--distance"),
    (("--weights", "/nonexistent"), "--weights"),
])
def test_demo_seeds_refuses(args, says):
    refused(run("demo_seeds", *args), says)


@pytest.mark.parametrize("args, says", [
    (("--num", "-1"), "--num"),
    (("--num", "0"), "--num"),
    (("--passkey-frac", "nan"), "--passkey-frac"),
    (("--passkey-frac", "1.5"), "--passkey-frac"),
    (("--seq-len", "-1"), "--seq-len"),
    (("--seq-len", "50"), "--seq-len"),            # no passkey fits
    (("--seq-len", "99999999"), "--seq-len"),      # past the split
    (("--dist-min", "500"), "--dist-min"),         # past what a 256-token sequence fits
    (("--dist-min", "60", "--dist-max", "50"), "--dist-min"),
    (("--seed", "-1"), "--seed"),
    (("--data", "/nonexistent"), "--data"),
])
def test_make_distill_data_refuses_and_writes_nothing(tmp_path, args, says):
    out = tmp_path / "d.jsonl"
    refused(run("make_distill_data", "--data", WORK["cwd"] / "data" / "demo", "--out", out, "--num", 2, "--seq-len", 256, *args), says)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_make_distill_data_checks_its_outputs_first(tmp_path, a_file):
    refused(run("make_distill_data", "--out", a_file / "d.jsonl", "--num", 2, "--seq-len", 256), "--out")
    out = tmp_path / "d.jsonl"
    refused(run("make_distill_data", "--out", out, "--stats", a_file / "s.json", "--num", 2, "--seq-len", 256),
            "--stats")
    assert not out.exists()


@pytest.mark.parametrize("script,flag", [("make_distill_data", "--out"), ("make_distill_data", "--stats"),
                                         ("evaluate", "--out-json"), ("evaluate", "--out-md")])
def test_an_output_file_given_as_a_folder_is_named_as_such(tmp_path, script, flag):
    """A folder given for a JSON / JSONL / Markdown output was told to "give a file name ending in
    .safetensors" (the weights writer's advice)."""
    args = {"make_distill_data": ("--out", tmp_path / "d.jsonl", "--num", 2, "--seq-len", 256),
            "evaluate": ("--model", MODEL, *SMALL_EVAL)}[script]
    r = run(script, *args, flag, tmp_path)
    refused(r, f"{flag} {tmp_path} is a folder; give a file path")
    assert ".safetensors" not in r.stderr and list(tmp_path.iterdir()) == []


def test_make_distill_data_stats_onto_out_is_refused(tmp_path):
    """--stats naming the --out file wrote the counts over the sequences (exit 0, the data gone)."""
    out = tmp_path / "d.jsonl"
    refused(run("make_distill_data", "--out", out, "--stats", tmp_path / "." / "d.jsonl", "--num", 2, "--seq-len",
                256), "--stats")
    assert list(tmp_path.iterdir()) == []


def test_make_distill_data_ctrl_c_is_one_line_and_leaves_no_half_written_file(tmp_path):
    """Ctrl-C while the sequences were written printed a KeyboardInterrupt traceback and left the half-written
    d.jsonl.tmp beside --out; now one line, exit 130, and nothing in the folder."""
    import signal
    import time
    from signals import interrupt
    out = tmp_path / "d.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(DEMO / "make_distill_data.py"), "--out", str(out), "--num", "10000000",
                          "--seq-len", "256"], cwd=WORK["cwd"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # (not ignored here)
    tmp = tmp_path / "d.jsonl.tmp"
    end = time.time() + TIMEOUT_S
    while not (tmp.exists() and tmp.stat().st_size > 1 << 20) and p.poll() is None and time.time() < end:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-2000:]
    interrupt(p, "make_distill_data")
    assert list(tmp_path.iterdir()) == []


def test_make_distill_data_still_writes_its_sequences(tmp_path):
    out, stats = tmp_path / "sub" / "d.jsonl", tmp_path / "s.json"
    r = run("make_distill_data", "--out", out, "--stats", stats, "--num", 3, "--seq-len", 256, "--dist-min", 60,
            "--answer-weight", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3 and all(len(x["input_ids"]) == 256 and "loss_weights" in x for x in recs)
    assert json.loads(stats.read_text())["with_passkey"] == 3


@pytest.mark.parametrize("args, says", [
    (("--heldout-permille", "-5"), "--heldout-permille"),
    (("--heldout-permille", "0"), "--heldout-permille"),
    (("--heldout-permille", "900", "--distill-permille", "200"), "--distill-permille"),
    (("--vocab-size", "10"), "--vocab-size"),
    (("--stdlib", "/nonexistent"), "--stdlib"),
    (("--check",), "--out"),                       # no earlier manifest to check against
])
def test_build_corpus_refuses_before_building(tmp_path, args, says):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    out = tmp_path / "corpus"
    refused(run("build_corpus", "--stdlib", src, "--out", out, "--vocab-size", 300, *args), says)
    assert not out.exists()


def test_build_corpus_checks_out_first(tmp_path, a_file):
    refused(run("build_corpus", "--out", a_file / "corpus"), "--out")


def test_build_corpus_a_failed_check_keeps_the_build_it_checked_against(tmp_path):
    """--check built over --out before comparing: a failed check replaced the earlier build (and its manifest),
    so the next --check passed."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    out = tmp_path / "corpus"
    args = ("--stdlib", src, "--out", out, "--vocab-size", 300)
    assert run("build_corpus", *args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "m3.py").write_text("def f3(x):\n    return x * 3\n")
    r = run("build_corpus", *args, "--check")
    assert r.returncode == 1 and "CHECK FAILED" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # nothing replaced, no temporary left
    assert run("build_corpus", *args, "--check").returncode == 1          # and it fails again
    (src / "m3.py").write_text("def f3(x):\n    return x + 3\n")
    r = run("build_corpus", *args, "--check")
    assert r.returncode == 0 and "check: identical" in r.stdout, r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("args, says", [
    (("--modes", "bogus"), "--modes"),
    (("--modes", "full,full"), "--modes"),
    (("--distances", "abc"), "--distances"),
    (("--distances", "5000"), "--distances"),      # does not fit --seq-len 256
    (("--edges", "200,100"), "--edges"),
    (("--seq-len", "-1"), "--seq-len"),
    (("--seq-len", "60"), "--seq-len"),            # no position past S + W
    (("--n-text", "0"), "--n-text"),
    (("--seed", "-1"), "--seed"),
    (("--attach", "pipeline"), "--attach"),
    (("--model", "/nonexistent"), "--model"),
    (("--data", "/nonexistent"), "--data"),
])
def test_evaluate_refuses(tmp_path, args, says):
    refused(run("evaluate", "--model", MODEL, *SMALL_EVAL, "--out-json", tmp_path / "e.json", *args), says)
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("heldout, says", [(b"", "is empty"), (b"\x01\x00\x02", "damaged or truncated")])
@pytest.mark.parametrize("script", ["evaluate", "gap_anatomy", "make_distill_data"])
def test_an_empty_or_cut_short_split_is_one_line(tmp_path, script, heldout, says):
    """A split without files (build_corpus.py writes an empty .bin) or a .bin of an odd number of bytes: numpy's
    mmap error was a traceback."""
    data = linked_corpus(tmp_path, but="heldout.bin")
    (data / "heldout.bin").write_bytes(heldout)
    args = {"evaluate": ("--model", MODEL, *SMALL_EVAL), "gap_anatomy": ("--model", MODEL, "--seq-len", 256),
            "make_distill_data": ("--split", "heldout", "--out", tmp_path / "d.jsonl", "--num", 1,
                                  "--seq-len", 128)}[script]
    refused(run(script, "--data", data, *args), says)
    assert not (tmp_path / "d.jsonl").exists()


def test_evaluate_checks_its_outputs_before_the_evaluation(tmp_path, a_file):
    """--out-md that cannot be written was found after the whole evaluation (a traceback, --out-json lost)."""
    r = run("evaluate", "--model", MODEL, *SMALL_EVAL, "--out-json", tmp_path / "e.json", "--out-md", a_file / "e.md")
    refused(r, "--out-md")
    assert "[eval]" not in r.stdout and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("script", ["evaluate", "gap_anatomy"])
def test_out_md_and_out_json_naming_one_file_are_refused(tmp_path, script):
    """--out-md and --out-json naming the same file: the JSON was written over the table after the whole
    evaluation (exit 0, the table gone)."""
    args = {"evaluate": SMALL_EVAL, "gap_anatomy": ("--seq-len", 256, "--n-text", 1)}[script]
    r = run(script, "--model", MODEL, *args, "--out-md", tmp_path / "r", "--out-json", tmp_path / "." / "r")
    refused(r, "--out-json")
    assert "[eval]" not in r.stdout and "[anatomy]" not in r.stdout and list(tmp_path.iterdir()) == []


def test_evaluate_and_variants_table_still_run(tmp_path, a_file):
    ev = tmp_path / "gdn" / "eval"
    r = run("evaluate", "--model", MODEL, *SMALL_EVAL, "--out-json", ev / "eval.json", "--out-md", ev / "eval.md")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[eval] ahn" in r.stdout and (ev / "eval.md").read_text() in r.stdout
    out = tmp_path / "variants.md"
    r = run("variants_table", "--run", f"gdn={tmp_path / 'work'}", "--eval-root", tmp_path, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| ahn-gdn |" in out.read_text()
    # and its own mistakes: an output below a file, a --run without =DIR, a damaged eval.json
    refused(run("variants_table", "--run", "gdn=x", "--eval-root", tmp_path, "--out", a_file / "v.md"), "--out")
    refused(run("variants_table", "--run", "gdn", "--eval-root", tmp_path, "--out", out), "--run")
    good = json.loads((ev / "eval.json").read_text())
    # the right modes without their fields (it was a KeyError traceback), and a damaged AHN checkpoint
    del good["modes"]["ahn"]["text_loss"]
    (ev / "eval.json").write_text(json.dumps(good))
    refused(run("variants_table", "--run", "gdn=x", "--eval-root", tmp_path, "--out", out), "text_loss")
    (tmp_path / "work" / "ahn").mkdir(parents=True)
    (tmp_path / "work" / "ahn" / "model.safetensors").write_bytes(b"\x06\x00\x00\x00\x00\x00\x00\x00[1, 2]")
    refused(run("variants_table", "--run", f"gdn={tmp_path / 'work'}", "--eval-root", tmp_path, "--out", out),
            "model.safetensors")
    (ev / "eval.json").write_text("{")
    refused(run("variants_table", "--run", "gdn=x", "--eval-root", tmp_path, "--out", out), "eval.json")


@pytest.mark.parametrize("args, says", [
    (("--seq-len", "-1"), "--seq-len"),
    (("--seq-len", "40"), "--seq-len"),
    (("--n-text", "0"), "--n-text"),
    (("--model", "/nonexistent"), "--model"),
    (("--data", "/nonexistent"), "--data"),
])
def test_gap_anatomy_refuses(args, says):
    refused(run("gap_anatomy", "--model", MODEL, "--seq-len", 256, "--n-text", 1, *args), says)


def test_gap_anatomy_checks_its_output_first(a_file):
    r = run("gap_anatomy", "--model", MODEL, "--seq-len", 256, "--n-text", 1, "--out-md", a_file / "a.md")
    refused(r, "--out-md")
    assert "[anatomy]" not in r.stdout


PROBE = ("--seq-len", "256", "--window", "32", "--sinks", "8", "--distances", "150", "--n-passkey", "1",
         "--n-text", "1", "--threads", "1")


@pytest.mark.parametrize("args, says", [
    (("train", "--steps", "0"), "--steps"),
    (("train", "--layers", "abc"), "--layers"),
    (("train", "--layers", "9"), "--layers"),      # the demo teacher has 6
    (("train", "--heads", "7"), "--heads"),
    # given empty (an unset shell variable): trained every layer / every head, as if not given
    (("train", "--layers", ""), "--layers needs at least one number"),
    (("train", "--heads", ""), "--heads needs at least one number"),
    # the checkpoint's own memory has its gates: the flag was ignored
    (("train", "--init-from-model", "--decay-init", "official"), "--decay-init official sets a fresh memory's"),
    (("train", "--lr", "nan"), "--lr"),
    (("train", "--answer-weight", "0", "--text-weight", "0"), "--text-weight"),
    (("train", "--window", "200"), "--window"),    # its training passkeys do not fit 256 tokens
    (("heads", "--distances", "abc"), "--distances"),
    (("heads", "--distances", "5000"), "--distances"),
    (("heads", "--model", "/nonexistent"), "--model"),
])
def test_recall_probe_refuses(tmp_path, args, says):
    refused(run("recall_probe", *PROBE, *args, "--out", tmp_path / "p.json"), says)
    assert not (tmp_path / "p.json").exists()


def test_recall_probe_init_from_a_model_without_a_memory_is_one_line(tmp_path):
    """--init-from-model on a base model (no model.layers.N.ahn.* tensors) was a KeyError traceback."""
    from safetensors.torch import load_file, save_file
    base = tmp_path / "base"
    base.mkdir()
    tensors = load_file(str(MODEL / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".ahn." not in k}, str(base / "model.safetensors"))
    (base / "config.json").write_bytes((MODEL / "config.json").read_bytes())
    r = run("recall_probe", "train", *PROBE, "--steps", 1, "--model", base, "--init-from-model",
            "--out", tmp_path / "p.json")
    refused(r, "--init-from-model")
    assert not (tmp_path / "p.json").exists()


def test_recall_probe_checks_its_output_first(a_file):
    refused(run("recall_probe", "train", *PROBE, "--steps", 1, "--out", a_file / "p.json"), "--out")


TINY = ("--steps", "1", "--batch", "1", "--seq-len", "256", "--hidden", "32", "--layers", "1", "--heads", "1",
        "--head-dim", "32", "--mlp", "32", "--eval-every", "0", "--device", "cpu")


@pytest.mark.parametrize("args, says", [
    (("--steps", "0"), "--steps"),
    (("--seq-len", "-1"), "--seq-len"),
    (("--seq-len", "50"), "--seq-len"),            # no passkey fits
    (("--lr", "nan"), "--lr"),
    (("--min-lr-ratio", "2"), "--min-lr-ratio"),
    (("--log-every", "0"), "--log-every"),
    (("--passkey-frac", "-0.5"), "--passkey-frac"),
    (("--device", "gpu"), "device"),
    (("--data", "/nonexistent"), "--data"),
])
def test_train_teacher_refuses_and_writes_nothing(tmp_path, args, says):
    out = tmp_path / "teacher"
    refused(run("train_teacher", *TINY, "--out", out, *args), says)
    assert not out.exists()


def test_outputs_never_write_over_the_corpus(tmp_path):
    """make_distill_data.py --out data/demo/heldout.bin replaced the split it had read; train_teacher.py --out
    <the --data folder> --overwrite trained, then failed copying tokenizer.json onto itself. (The corpus here is
    links to the real one: an output written over a link replaces the link, never the corpus.)"""
    data = linked_corpus(tmp_path)
    names = sorted(p.name for p in data.iterdir())
    small = ("--num", 1, "--seq-len", 256)
    refused(run("make_distill_data", "--data", data, "--split", "heldout", "--out", data / "heldout.bin", *small),
            "--out")
    refused(run("make_distill_data", "--data", data, "--out", tmp_path / "d.jsonl", "--stats", data / "manifest.json",
                *small), "--stats")
    refused(run("train_teacher", *TINY, "--data", data, "--out", data, "--overwrite"), "the corpus of --data")
    assert sorted(p.name for p in data.iterdir()) == names and all(p.is_symlink() for p in data.iterdir())
    assert not (tmp_path / "d.jsonl").exists()


def test_train_teacher_reads_a_hand_edited_manifest_up_front(tmp_path):
    """A manifest without <|im_end|> among its special tokens was a KeyError traceback; one without its sha256
    record failed after the whole run (train_summary.json reads it). Now refused first, and trained through."""
    data = linked_corpus(tmp_path, but="manifest.json")
    manifest = json.loads((WORK["cwd"] / "data" / "demo" / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "special_tokens": {"<|endoftext|>": 0}}))
    refused(run("train_teacher", *TINY, "--data", data, "--out", tmp_path / "t1"), "<|im_end|>")
    assert not (tmp_path / "t1").exists()
    del manifest["sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    r = run("train_teacher", *TINY, "--data", data, "--out", tmp_path / "t2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "t2" / "train_summary.json").read_text())["corpus_sha256"] is None


def test_train_teacher_checks_out_first(a_file):
    refused(run("train_teacher", *TINY, "--out", a_file), "--out")


def test_train_teacher_refuses_to_train_over_a_teacher_unless_told(tmp_path):
    """A second run into the same --out truncated the first one's log.jsonl at its first step and replaced
    its model at the end, unasked; now it is refused before any work (nothing touched), and --overwrite
    trains over it."""
    out = tmp_path / "teacher"
    assert run("train_teacher", *TINY, "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "log.jsonl" in before and "model.safetensors" in before
    refused(run("train_teacher", *TINY, "--out", out, "--seed", "1"), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run("train_teacher", *TINY, "--out", out, "--seed", "1", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.parametrize("script", ["evaluate", "gap_anatomy", "recall_probe", "merge_resume"])
def test_ctrl_c_while_torch_imports_is_one_line(script):
    """Ctrl-C in the seconds a demo script spends importing torch printed torch's import traceback (the
    scripts that import it at the top); now one line, exit 130, as mid-run."""
    import signal
    from signals import interrupt, wait_for_mapped
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(DEMO / f"{script}.py"), "--help"], cwd=WORK["cwd"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_mapped(p.pid, "libtorch", timeout=120)
    assert p.poll() is None, "the script ended before torch was imported"
    interrupt(p, script)


def _script_tree(tmp_path):
    """tmp_path/tree: the demo scripts (links), the package and the module's corpus, laid out as a checkout, so
    that a pipeline script (which runs from its checkout's root, on its data/demo) runs here in CI too."""
    tree = tmp_path / "tree"
    (tree / "scripts" / "demo").mkdir(parents=True)
    for f in DEMO.iterdir():
        (tree / "scripts" / "demo" / f.name).symlink_to(f)
    (tree / "ahn_rt").symlink_to(ROOT / "ahn_rt")
    (tree / "data").mkdir()
    (tree / "data" / "demo").symlink_to((WORK["cwd"] / "data" / "demo").resolve())
    return tree


def test_run_gpu_stops_after_the_teacher_when_asked(tmp_path):
    """STOP_AFTER=teacher (a pipeline that does not fit one device call): the teacher alone, shipped to
    $OUT/teacher as a model the next call takes as TEACHER=; a wrong value or one that contradicts TEACHER
    is one line before any work."""
    tree = _script_tree(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "SMOKE_OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work")}

    def sh(**extra):
        return subprocess.run(["bash", str(tree / "scripts" / "demo" / "run_gpu.sh"), "--smoke"], cwd=tree,
                              env={**env, **extra}, capture_output=True, text=True, timeout=TIMEOUT_S)
    for extra, says in (({"STOP_AFTER": "distill"}, "STOP_AFTER=distill"),
                        ({"STOP_AFTER": "teacher", "TEACHER": str(MODEL)}, "unset one of them")):
        refused(sh(**extra), says)
        assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    r = sh(STOP_AFTER="teacher")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stopped after the teacher" in r.stdout and "== distill" not in r.stdout
    shipped = tmp_path / "out" / "teacher"
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors", "tokenizer.json"]
    assert (shipped / "model.safetensors").read_bytes() == (tmp_path / "work" / "teacher" / "model.safetensors").read_bytes()
    assert (tmp_path / "work" / "distill.jsonl").stat().st_size > 0     # the next call's data, written meanwhile
    assert not (tmp_path / "work" / "ahn").exists()


def test_two_writers_of_one_distillation_file_keep_apart(tmp_path):
    """make_distill_data wrote through the fixed temporary <out>.tmp: a second run into the same --out (or a
    file of that name) was written over and renamed away mid-run. Its temporary is now its own (the runtime's
    atomic_write, which also puts the data on the disk before the rename), and build_corpus writes so too."""
    out = tmp_path / "d.jsonl"
    other = tmp_path / "d.jsonl.tmp"
    other.write_text("another run's file\n")
    r = run("make_distill_data", "--out", out, "--num", 2, "--seq-len", 256, "--seed", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert other.read_text() == "another run's file\n"
    assert len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.tmp"]
