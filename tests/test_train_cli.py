"""`python -m ahn_rt.train` end to end on a tiny random Qwen2 (written with ahn_rt.init_weights +
write_checkpoint, float32, V = 271) with pre-tokenized data, and one ChatML run with a byte-level
tokenizer.json built here: the outputs load in ahn_rt and compute what the trained student computes; a
stopped run resumes to the same losses; every bad input exits 2 with one line and writes nothing; Ctrl-C
exits 130 and leaves a complete resume state.

Most runs call ``main(argv)`` in this process (no second torch import); one test runs the real entry point
in a subprocess for the exit codes, the absent traceback and a real SIGINT.

Tolerance table (everything else is exact: exit codes, files, log records, the resumed losses):

  MODEL_ATOL  1e-5  absolute, float32 logits (|logit| < ~3) of ahn_rt inference (its own kernels) vs the
                    trained TrainModel's student on the same weights: two float32 computations of one
                    function in different op orders (tests/test_train_core.py uses the same bound).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ahn_rt
from ahn_rt.config import parse_config
from ahn_rt.init_weights import random_state_dict
from ahn_rt.train import checkpoint as ckpt_io
from ahn_rt.train.__main__ import main
from ahn_rt.train.model import TrainModel
from ahn_rt.train.trainer import Trainer
from ahn_rt.weights import ahn_shapes, write_checkpoint

MODEL_ATOL = 1e-5

V = 271
CFG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, hidden_act="silu",
           rms_norm_eps=1e-6, torch_dtype="float32", eos_token_id=258)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and on a busy 2-core runner extra threads
    only spin against each other (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny_tokenizer(path):
    """A byte-level tokenizer.json with no merges (one token per byte) plus the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))
    return path


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    sd = random_state_dict(CFG, ahn=False, dtype=torch.float32, std=0.2, seed=2)
    write_checkpoint(root / "base" / "model.safetensors", sd, CFG, config_json=True)
    tiny_tokenizer(root / "base" / "tokenizer.json")
    rng = random.Random(0)
    write_jsonl(root / "ids.jsonl", [{"input_ids": [rng.randrange(V) for _ in range(rng.randrange(30, 60))]}
                                     for _ in range(6)] + ["{broken"])
    return root, sd


def train(capsys, *args):
    """main(argv) in this process -> (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:   # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def base_args(root, out, data="ids.jsonl"):
    return ["--base", root / "base", "--data", root / data, "--out", out, "--log-every", 1]


# ----------------------------------------------------------------------------------------------
def test_train_writes_outputs_that_ahn_rt_runs(tiny, capsys):
    root, sd = tiny
    out = root / "run_fixed"
    rc, _, err = train(capsys, *base_args(root, out), "--steps", 4, "--window", 8, "--sinks", 2, "--batch", 2,
                       "--lr", "1e-2", "--save-dtype", "float32", "--merge")
    assert rc == 0, err
    assert "Traceback" not in err and "6 of 7 records used" in err and "1 invalid JSON" in err
    # log: one record per optimizer step, the loss before the step's update
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert all({"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r) for r in log)
    assert log[0]["loss"] > 0 and log[-1]["lr"] < log[0]["lr"]
    # config.json: the base's plus the AHN fields of a fixed-window run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["num_attn_sinks"] == 2
    assert cfg["_ahn_implementation"] == "GatedDeltaNet" and cfg["_layer_implementation"] == "Qwen2MemDecoderLayer"
    assert all(cfg[k] == v for k, v in CFG.items() if k != "torch_dtype")
    # model.safetensors: AHN only, official names and shapes, float32 as asked
    config = parse_config(CFG, "test")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == ahn_shapes(config, "GatedDeltaNet")
    assert all(v.dtype == torch.float32 for v in saved.values())
    # the trained student (its float32 master weights from the resume state) == ahn_rt inference
    _, master, _ = ckpt_io.load_resume(out / "resume")
    assert all(torch.equal(master[k], saved[k]) for k in saved)
    student = TrainModel(config, sd, master, base_dtype=torch.float32)
    ids = torch.tensor([[random.Random(9).randrange(V) for _ in range(40)]])
    with torch.no_grad():
        want = student.lm_logits(student.forward_student(ids, torch.tensor([8]), torch.tensor([2])))[0]
    model = ahn_rt.load(root / "base", ahn=out / "model.safetensors", dtype="float32", device="cpu")
    assert (model.config.mode, model.config.window, model.config.sinks) == ("ahn", 8, 2)
    got = model.new_session().forward(ids[0].tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=MODEL_ATOL)
    with torch.no_grad():
        swa = student.lm_logits(student.forward_teacher(ids))[0]
    assert (got - swa).abs().max() > 100 * MODEL_ATOL          # the memory is on and trained
    # the merged folder runs on its own (base + AHN, config, tokenizer)
    merged = ahn_rt.load(out / "merged", dtype="float32", device="cpu")
    assert (merged.config.mode, merged.config.window, merged.config.sinks) == ("ahn", 8, 2)
    assert (out / "merged" / "tokenizer.json").exists()
    torch.testing.assert_close(merged.new_session().forward(ids[0].tolist()), want, rtol=0, atol=MODEL_ATOL)


def test_chatml_data_random_windows_default_bf16_output(tiny, capsys):
    root, _ = tiny
    msgs = [[{"role": "user", "content": f"question {i}: " + "why? " * (5 + 3 * i)},
             {"role": "assistant", "content": "because " * (4 + 2 * i)}] for i in range(4)]
    write_jsonl(root / "chat.jsonl", [{"messages": m} for m in msgs] + [{"messages": "nope"}])
    out = root / "run_chat"
    rc, _, err = train(capsys, *base_args(root, out, "chat.jsonl"), "--steps", 2, "--seq-len", 200)
    assert rc == 0, err
    assert "4 of 5 records used" in err and "random S+W" in err
    assert "loss curve" in err and (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # (either way)
    cfg = json.loads((out / "config.json").read_text())
    # a random-window run writes the runtime's inference defaults: S + W = 32768
    assert (cfg["sliding_window"], cfg["num_attn_sinks"]) == (32640, 128)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model = ahn_rt.load(root / "base", ahn=out / "model.safetensors", device="cpu")
    assert (model.config.mode, model.config.window, model.config.sinks) == ("ahn", 32640, 128)
    assert model.new_session().forward([1, 2, 3]).shape == (3, V)


def test_stop_and_resume_reproduce_the_straight_run(tiny, capsys):
    root, _ = tiny
    common = ["--steps", 4, "--batch", 2, "--grad-accum", 2, "--lr", "1e-2", "--seed", 3]
    straight, split = root / "straight", root / "split"
    assert train(capsys, *base_args(root, straight), *common)[0] == 0
    rc, _, err = train(capsys, *base_args(root, split), *common, "--stop-after", 2)
    assert rc == 0 and "continue with --resume" in err and not (split / "model.safetensors").exists()
    # a new run into a used OUT, or a resume that changes the run, is refused
    rc, _, err = train(capsys, *base_args(root, split), *common)
    assert rc == 2 and "already holds a training run" in err
    rc, _, err = train(capsys, *base_args(root, split), "--resume", "--lr", "2e-2")
    assert rc == 2 and "differs from the resumed run" in err and err.count("\n") == 1
    # a --stop-after the run has already passed did nothing and said "stopped after step 2 of 4"
    before = (split / "log.jsonl").read_bytes()
    for n in (1, 2):
        rc, _, err = train(capsys, *base_args(root, split), "--resume", "--stop-after", n)
        assert rc == 2 and err == (f"error: --stop-after {n}: the resumed run is already at step 2 (of 4); give "
                                   "--stop-after above 2, or leave it out to train to the end\n"), err
    assert (split / "log.jsonl").read_bytes() == before
    rc, _, err = train(capsys, *base_args(root, split), "--resume")      # settings come from the state
    assert rc == 0, err
    a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    with safe_open(str(straight / "model.safetensors"), "pt") as f, safe_open(str(split / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_a_flag_the_resumed_run_did_not_set_is_named_as_such(tiny, capsys):
    """A resume given a setting that the run was started without said "--steps 12 differs from the resumed
    run's None" (None: not a value the user ever wrote); a list said "[0, 1]". Now the line says the run was
    started without the flag, and writes values as the command line does."""
    root, _ = tiny
    out = root / "resume_unset_flag"
    rc, _, err = train(capsys, *base_args(root, out), "--window-max", 32, "--train-layers", 1, "--stop-after", 1)
    assert rc == 0, err
    for flag, value, was in (("--steps", 6, "was started without --steps"),
                             ("--window", 8, "was started without --window"),
                             ("--train-layers", "0-1", "has --train-layers 1")):
        extra = ["--sinks", 2] if flag == "--window" else []
        rc, _, err = train(capsys, *base_args(root, out), "--resume", flag, value, *extra)
        assert rc == 2 and err.count("\n") == 1 and "None" not in err and "[" not in err, err
        shown = "0,1" if flag == "--train-layers" else value
        assert err == (f"error: {flag} {shown} differs from the resumed run, which {was}; drop the flag or start "
                       "a new run in another --out\n"), err


@pytest.mark.parametrize("damage", ["no run", "step not a number", "files a list", "format only",
                                    "short python_rng", "no schedule.total_steps"])
def test_resume_from_a_damaged_state_json_is_one_line(tiny, capsys, tmp_path, damage):
    """state.json edited by hand or damaged (its format tag intact; the tensor files are checked by hash):
    one line naming the bad fields, exit 2, and the state and log are left as they were (it was a KeyError,
    ValueError or AttributeError traceback)."""
    root, _ = tiny
    out = tmp_path / "run"
    rc, _, err = train(capsys, *base_args(root, out), "--steps", 3, "--window", 8, "--sinks", 2, "--stop-after", 1)
    assert rc == 0, err
    path = out / "resume" / "state.json"
    state = json.loads(path.read_text())
    if damage == "no run":
        del state["run"]
    elif damage == "step not a number":
        state["step"] = "one"
    elif damage == "files a list":
        state["files"] = list(state["files"])
    elif damage == "format only":
        state = {"format": state["format"]}
    elif damage == "short python_rng":
        state["python_rng"][1] = state["python_rng"][1][:10]
    else:
        del state["schedule"]["total_steps"]
    path.write_text(json.dumps(state))
    before = {p.name: p.read_bytes() for p in [path, out / "log.jsonl"]}
    rc, stdout, err = train(capsys, *base_args(root, out), "--resume")
    assert rc == 2 and err.count("\n") == 1 and stdout == "", err
    assert err.startswith(f"error: resume state {out / 'resume'} is damaged: state.json has no valid "), err
    assert "remove the folder to start over" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in [path, out / "log.jsonl"]} == before
    assert not (out / "model.safetensors").exists()


def test_train_layers_is_recorded_resumed_and_leaves_the_rest_fresh(tiny, capsys):
    root, sd = tiny
    common = ["--steps", 3, "--batch", 2, "--lr", "1e-2", "--window", 8, "--sinks", 2, "--save-dtype", "float32"]
    out = root / "run_layer1"
    rc, _, err = train(capsys, *base_args(root, out), *common, "--train-layers", "1", "--stop-after", 1)
    assert rc == 0, err
    assert "training layers 1 only" in err
    assert json.loads((out / "run.json").read_text())["run"]["train_layers"] == [1]
    rc, _, err = train(capsys, *base_args(root, out), "--resume", "--train-layers", "0,1")
    assert rc == 2 and "differs from the resumed run" in err and err.count("\n") == 1
    rc, _, err = train(capsys, *base_args(root, out), "--resume", "--save-dtype", "float32")
    assert rc == 0 and "training layers 1 only" in err, err
    config = parse_config(CFG, "test")
    fresh = TrainModel(config, sd, None, base_dtype=torch.float32, seed=0).ahn_state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert set(saved) == set(fresh)
    for k, v in saved.items():      # layer 0: the fresh memory (o_proj = 0); layer 1 trained
        if k.startswith("model.layers.0."):
            assert torch.equal(v, fresh[k]), k
        elif not k.endswith(".D"):  # (GatedDeltaNet does not use D: it gets no gradient)
            assert not torch.equal(v, fresh[k]), k
    assert not saved["model.layers.0.ahn.fn.o_proj.weight"].any()


@pytest.fixture(scope="module")
def bad_files(tiny):
    root, sd = tiny
    bad = root / "bad"
    bad.mkdir()
    config = parse_config(CFG, "test")
    ahn_only = {k: torch.zeros(s) for k, s in ahn_shapes(config, "GatedDeltaNet").items()}
    write_checkpoint(bad / "ahn_only.safetensors", ahn_only, ckpt_io.output_config(CFG, "qwen2", 8, 2))
    write_checkpoint(bad / "merged.safetensors", {**sd, **ahn_only}, ckpt_io.output_config(CFG, "qwen2", 8, 2))
    write_jsonl(bad / "empty.jsonl", [""])
    write_jsonl(bad / "junk.jsonl", ["{", "[]", {"input_ids": [V + 5]}])
    write_jsonl(bad / "short.jsonl", [{"input_ids": [1] * 20}])
    (bad / "a_file").write_text("x")
    write_jsonl(bad / "text.jsonl", [{"text": "x" * 40}] * 4 + [{"text": "x" * 40 + "<|extra_19|>"}])
    from tokenizers import Tokenizer
    big = Tokenizer.from_file(str(root / "base" / "tokenizer.json"))   # 259 tokens; the base has V = 271 rows
    big.add_special_tokens([f"<|extra_{i}|>" for i in range(20)])
    big.save(str(bad / "big_tokenizer.json"))
    return bad


@pytest.mark.parametrize("case,needle", [
    ("missing base", "not found"),
    ("AHN-only base", "AHN-only checkpoint; give the base model as --base"),
    ("missing data", "data file not found"),
    ("empty data", "is empty"),
    ("no usable record", "no usable record"),
    ("shorter than the window", "sequence shorter than the window"),
    ("unknown flag", "unrecognized arguments"),
    ("window without sinks", "--window and --sinks go together"),
    # these said "--window-min None / --window-max 1 leave no total budget in [...]"
    ("window-max below every budget", "--window-max 16: none of the total budgets S+W [32,"),
    ("window-min above every budget", "--window-min 9000: none of the total budgets S+W [32,"),
    ("window-min above window-max", "--window-min 512 is above --window-max 64; swap them"),
    ("out is a file", "is a file"),
    ("out under a file", "is a file"),
    ("resume without state", "no resume state"),
    ("init-from-base without AHN", "holds no AHN weights"),
    ("init-ahn without AHN", "holds no AHN tensors (model.layers.N.ahn.fn.*); give an AHN checkpoint"),
    # said "... but asked for'DeltaNet'"
    ("init-ahn of another variant", "these tensors are an AHN-GatedDeltaNet memory but asked for 'DeltaNet'"),
    ("bad number", "--lr must be"),
    ("train-layers junk", "not a list of layer numbers"),
    ("train-layers out of range", "the base has layers 0..1"),
    ("lr beyond float32", "is too large: AdamW's float32 update overflows"),
    ("seed too large", "--seed must be in 0..9223372036854775807"),
    ("seed negative", "--seed must be in 0..9223372036854775807"),
    ("unknown attention switch", "AHN_RT_TRAIN_ATTENTION='bogus' is not one of auto, sdpa, flex"),
    ("flex attention on the CPU", "use sdpa or auto on the CPU"),
    ("out empty", "--out is empty"),
    ("base path empty", "--base is empty"),                # pathlib's current folder
    ("init-ahn path empty", "--init-ahn is empty"),        # was ignored: a fresh memory
    ("tokenizer path empty", "--tokenizer is empty"),      # was ignored: the base's tokenizer
    # ids past the embedding: each record holding one was skipped, the run went on with what was left
    ("tokenizer larger than the base", "has 279 tokens but the base model's embedding has 271 rows (ids "
                                       "271..278 have none); give the base model's tokenizer.json as --tokenizer"),
    ("out cannot be created", "choose another --out"),
    # a step of more sequences than the data holds repeated them; a huge --batch hung building the order
    ("global batch above the data", "--batch 4 x --grad-accum 2 = 8 sequences per step, but "),
    ("huge batch", "--batch 99999999999 x --grad-accum 1 = 99999999999 sequences per step, but "),
    # a range of 1e12 layers hung building the list before the base was read
    ("train-layers huge range", "'0-999999999999': layer 999999999999 is beyond any model's layers"),
    # a CPU index other than 0 trained on the CPU as if it existed
    ("device that does not exist", "device 'cpu:3' does not exist: torch has one CPU device"),
    # written into config.json, which then loaded and failed at the first session ("cannot allocate")
    ("infer-window beyond any state", "--infer-window 100000000000000000000000 is more than a state can hold"),
    ("infer-sinks beyond any state", "--infer-sinks 2147483648 is more than a state can hold"),
    ("infer sinks + window beyond any state", "--sinks 2 + --infer-window 2147483647 = 2147483649 cache slots, "
                                              "more than a state can hold"),
    # a base holding AHN weights: the note that they go unused came first, making the error two lines
    ("train-layers out of range, base with AHN", "--train-layers 0,1,2: the base has layers"),
    # the last one won, silently
    ("checkpointing and no checkpointing", "--no-activation-checkpointing: not allowed with argument "
                                           "--activation-checkpointing"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, bad_files, capsys, monkeypatch, case, needle):
    root, _ = tiny
    out = root / "bad_out" / case.replace(" ", "_")
    args = {"base": root / "base", "data": root / "ids.jsonl", "out": out}
    extra = ["--steps", 1, "--window", 8, "--sinks", 2]
    if case == "missing base":
        args["base"] = root / "nope"
    elif case == "AHN-only base":
        args["base"] = bad_files / "ahn_only.safetensors"
    elif case == "missing data":
        args["data"] = root / "nope.jsonl"
    elif case == "empty data":
        args["data"] = bad_files / "empty.jsonl"
    elif case == "no usable record":
        args["data"] = bad_files / "junk.jsonl"
    elif case == "shorter than the window":
        args["data"] = bad_files / "short.jsonl"        # 20 tokens
        extra = ["--steps", 1, "--window", 16, "--sinks", 4]
    elif case == "unknown flag":
        extra += ["--bogus", 3]
    elif case == "window without sinks":
        extra = ["--window", 8]
    elif case == "window-max below every budget":
        extra = ["--window-max", 16]
    elif case == "window-min above every budget":
        extra = ["--window-min", 9000]
    elif case == "window-min above window-max":
        extra = ["--window-min", 512, "--window-max", 64]
    elif case == "out is a file":
        args["out"] = out = bad_files / "a_file"
    elif case == "out under a file":
        args["out"] = out = bad_files / "a_file" / "sub"
    elif case == "resume without state":
        extra += ["--resume"]
    elif case == "init-from-base without AHN":
        extra += ["--init-from-base"]
    elif case == "init-ahn without AHN":                  # the fix named --weights / --ahn, flags train has not
        extra += ["--init-ahn", root / "base" / "model.safetensors"]
    elif case == "init-ahn of another variant":
        extra += ["--init-ahn", bad_files / "ahn_only.safetensors", "--ahn", "dn"]
    elif case == "bad number":
        extra += ["--lr", "-1"]
    elif case == "train-layers junk":
        extra += ["--train-layers", "1,x"]
    elif case == "train-layers out of range":
        extra += ["--train-layers", "0-2"]
    elif case == "lr beyond float32":
        extra += ["--lr", "1e39"]                         # AdamW: "value cannot be converted to type float"
    elif case == "seed too large":
        extra += ["--seed", 10**23]                       # torch.manual_seed: "Overflow when unpacking long long"
    elif case == "seed negative":
        extra += ["--seed", -1]
    elif case == "unknown attention switch":
        monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "bogus")
    elif case == "flex attention on the CPU":             # documented, but forward-only there
        monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "flex")
        extra += ["--device", "cpu"]
    elif case == "out empty":                             # would write into the current folder
        monkeypatch.chdir(bad_files)
        args["out"] = out = ""
    elif case == "base path empty":
        args["base"] = ""
    elif case == "init-ahn path empty":
        extra += ["--init-ahn", ""]
    elif case == "tokenizer path empty":
        extra += ["--tokenizer", " "]
    elif case == "tokenizer larger than the base":
        args["data"] = bad_files / "text.jsonl"
        extra += ["--tokenizer", bad_files / "big_tokenizer.json"]
    elif case == "global batch above the data":
        extra += ["--batch", 4, "--grad-accum", 2]
    elif case == "train-layers huge range":
        extra += ["--train-layers", "0-999999999999"]
    elif case == "huge batch":
        extra += ["--batch", 99999999999]
    elif case == "device that does not exist":
        extra += ["--device", "cpu:3"]
    elif case == "infer-window beyond any state":
        extra += ["--infer-window", 10 ** 23]
    elif case == "infer-sinks beyond any state":
        extra += ["--infer-sinks", 2 ** 31]
    elif case == "infer sinks + window beyond any state":      # the fixed run's sinks are written with it
        extra += ["--infer-window", 2 ** 31 - 1]
    elif case == "train-layers out of range, base with AHN":
        args["base"] = bad_files / "merged.safetensors"
        extra += ["--train-layers", "0-2"]
    elif case == "checkpointing and no checkpointing":
        extra += ["--activation-checkpointing", "layer", "--no-activation-checkpointing"]
    elif case == "out cannot be created":                 # mkdir fails where os.access says yes (as root)
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc")
        args["out"] = out = Path("/proc/ahn_rt_test/run")
    before = sorted(p.name for p in bad_files.iterdir())
    rc, stdout, err = train(capsys, "--base", args["base"], "--data", args["data"], "--out", args["out"], *extra)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and stdout == ""
    assert "--weights" not in err and " --ahn " not in err        # flags of generate/serve, not of train
    if case.startswith("out"):
        assert sorted(p.name for p in bad_files.iterdir()) == before and (bad_files / "a_file").read_text() == "x"
        assert case != "out cannot be created" or not out.parent.exists()
    else:
        assert not out.exists()


@pytest.mark.parametrize("where", ["base folder", "base file's folder", "OUT/merged"])
def test_out_that_holds_the_base_model_is_refused_and_the_base_kept(tiny, capsys, tmp_path, where):
    """--out pointing at the base model's own folder: "already holds a training run; pass ... --overwrite"
    (its model.safetensors looked like a run's), and with --overwrite the run replaced the base's
    model.safetensors and config.json with its AHN-only ones; a base in OUT/merged was removed by --overwrite."""
    import shutil
    root, _ = tiny
    folder = tmp_path / "run"
    if where == "OUT/merged":
        rc, _, err = train(capsys, *base_args(root, folder), "--steps", 1, "--window", 8, "--sinks", 2, "--merge")
        assert rc == 0, err
        base, kept = folder / "merged", folder / "merged"
    else:
        shutil.copytree(root / "base", folder)
        base, kept = (folder if where == "base folder" else folder / "model.safetensors"), folder
    before = {p.relative_to(kept): p.read_bytes() for p in sorted(kept.rglob("*")) if p.is_file()}
    for extra in ([], ["--overwrite"]):
        rc, stdout, err = train(capsys, "--base", base, "--data", root / "ids.jsonl", "--out", folder, "--steps", 1,
                                "--window", 8, "--sinks", 2, *extra)
        assert rc == 2 and err.count("\n") == 1 and stdout == "", err
        assert f"--base {base} lies in --out {folder}" in err and "choose another --out" in err, err
        assert {p.relative_to(kept): p.read_bytes() for p in sorted(kept.rglob("*")) if p.is_file()} == before
    # a folder beside it is fine
    rc, _, err = train(capsys, "--base", base, "--data", root / "ids.jsonl", "--out", tmp_path / "other", "--steps",
                       1, "--window", 8, "--sinks", 2)
    assert rc == 0, err


def test_out_that_holds_another_models_files_is_refused_unless_overwrite(tiny, capsys, tmp_path):
    """--out pointing at a folder of someone else's files (another model's sharded checkpoint: config.json, no
    model.safetensors) ran and replaced its config.json with the run's; a run's own files start with run.json."""
    root, _ = tiny
    folder = tmp_path / "other_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    args = [*base_args(root, folder), "--steps", 1, "--window", 8, "--sinks", 2]
    rc, stdout, err = train(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and stdout == "", err
    assert f"--out {folder} holds config.json, not from a training run" in err and "--overwrite" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
    assert (folder / "config.json").read_text() == '{"model_type": "qwen2"}'
    rc, _, err = train(capsys, *args, "--overwrite")             # said so: replaced
    assert rc == 0, err
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == 8


@pytest.mark.parametrize("files", [("model.safetensors", "config.json"), ("model.safetensors",), ("log.jsonl",)])
def test_out_that_holds_another_models_weights_is_not_called_a_training_run(tiny, capsys, tmp_path, files):
    """--out pointing at another model's folder (model.safetensors, with or without config.json; no run.json):
    the line said it "already holds a training run with no resume state; pass --overwrite to start over", an
    invitation to delete those weights as if they were a stopped run's. A run's own files start with run.json;
    now the line says the files are not from a training run, as for a foreign config.json."""
    root, _ = tiny
    folder = tmp_path / "other_model"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"not ours")
    rc, stdout, err = train(capsys, *base_args(root, folder), "--steps", 1, "--window", 8, "--sinks", 2)
    assert rc == 2 and err.count("\n") == 1 and stdout == "", err
    assert f"--out {folder} holds {' and '.join(sorted(files))}, not from a training run (no run.json)" in err, err
    assert "already holds a training run" not in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert all((folder / name).read_bytes() == b"not ours" for name in files)


def test_data_under_home_is_expanded_as_base_out_and_tokenizer_are(tiny, capsys, monkeypatch):
    """``--data=~/ids.jsonl`` (the shell leaves a ~ after "=" alone): --base, --out and --tokenizer expand
    it, --data said "data file not found: ~/ids.jsonl"."""
    root, _ = tiny
    monkeypatch.setenv("HOME", str(root))
    out = root / "home_data"
    rc, _, err = train(capsys, "--base", "~/base", "--data=~/ids.jsonl", "--out", "~/home_data", "--steps", 1,
                       "--window", 8, "--sinks", 2)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()


def test_diverging_run_stops_with_one_line_exit_1_and_writes_no_model(tiny, capsys, monkeypatch):
    """A learning rate that makes the loss NaN: the run stops at the first non-finite loss / gradient norm with
    one line and exit 1 (a runtime failure), and never writes model.safetensors; resume states from before
    the divergence stay, and they are finite."""
    root, _ = tiny
    args = ["--steps", 4, "--window", 8, "--sinks", 2, "--lr", "1e30", "--warmup-ratio", 0, "--save-every", 1,
            "--save-dtype", "float32"]
    # without the check (the old behaviour) this run "succeeds" and writes non-finite weights
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_require_finite", lambda self, step, **values: None)
        old = root / "diverge_unchecked"
        rc, _, err = train(capsys, *base_args(root, old), *args)
    assert rc == 0, err
    with safe_open(str(old / "model.safetensors"), "pt") as f:
        assert not all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    out = root / "diverge"
    rc, stdout, err = train(capsys, *base_args(root, out), *args)
    assert rc == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("error: training diverged at step ") and "lower --lr" in errors[0], err
    assert "Traceback" not in err and stdout == ""
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    step = int(errors[0].split("step ")[1].split()[0])
    assert step >= 2 and len(log) == step - 1                # the diverged step is not logged
    state, ahn, _ = ckpt_io.load_resume(ckpt_io.find_resume(out))     # the state before it stays
    assert state["step"] == step - 1 and all(torch.isfinite(v).all() for v in ahn.values())


def test_real_entry_point_exit_codes_and_ctrl_c(tiny, tmp_path):
    root, _ = tiny
    env = dict(os.environ, PYTHONPATH=str(Path(ahn_rt.__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ahn_rt.train", "--base", str(root / "base"), "--data", str(root / "ids.jsonl")]
    p = subprocess.run(cmd + ["--out", str(tmp_path / "x"), "--window", "8"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out), "--steps", "100000", "--window", "8", "--sinks", "2",
                                   "--save-every", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        def logged():
            return len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0
        deadline = time.time() + 120
        while logged() < 3 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    # the last complete resume state is there, no temporaries, and --resume accepts it
    state, _, _ = ckpt_io.load_resume(ckpt_io.find_resume(out))
    logged = len((out / "log.jsonl").read_text().splitlines())
    assert 1 <= state["step"] <= logged
    assert not list(out.glob(".resume.tmp-*")) and not (out / "model.safetensors").exists()


def test_a_run_stopped_before_its_first_resume_state_is_started_over_not_resumed(tiny, capsys, monkeypatch):
    """Ctrl-C before the first resume state (every --save-every steps) leaves OUT/log.jsonl and no state.
    Each message sent the user to the other one: the interrupt said "continue with --resume", --resume said
    "run without --resume", and that said "already holds a training run; pass --resume". Now all three name
    --overwrite, which starts the run over."""
    root, _ = tiny
    out = root / "stopped_early"
    args = [*base_args(root, out), "--steps", 4, "--window", 8, "--sinks", 2, "--save-every", 100]
    real_step = Trainer.train_step

    def ctrl_c_at_step_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_at_step_2)
        rc, _, err = train(capsys, *args)
    assert rc == 130 and len((out / "log.jsonl").read_text().splitlines()) == 2 and not ckpt_io.find_resume(out)
    assert err.splitlines()[-1] == ("interrupted; stopped before the first resume state (written every --save-every "
                                    "steps); start over with --overwrite"), err
    rc, _, err = train(capsys, *args, "--resume")
    assert rc == 2 and err.count("\n") == 1 and "no resume state" in err, err
    assert "start it over with --overwrite instead of --resume" in err and "run without --resume" not in err
    rc, _, err = train(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and "no resume state to continue it from" in err, err
    assert "pass --overwrite to start over" in err and "--resume" not in err
    rc, _, err = train(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # interrupted once a state exists: continue with --resume; before anything was written: run it again
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_at_step_2)
        rc, _, err = train(capsys, *base_args(root, root / "stopped_late"), "--steps", 4, "--window", 8, "--sinks",
                           2, "--save-every", 1)
    assert rc == 130 and err.splitlines()[-1] == (f"interrupted; the last complete resume state is in "
                                                  f"{root / 'stopped_late' / 'resume'}, continue with --resume"), err
    with monkeypatch.context() as m:
        m.setattr(Trainer, "__init__", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        rc, _, err = train(capsys, *base_args(root, root / "stopped_first"), "--steps", 4)
    assert rc == 130 and err.splitlines()[-1] == "interrupted; nothing to resume yet; run the command again", err


def test_ctrl_c_finishes_its_step_writes_a_resume_state_and_resumes_to_the_same_losses(tiny, capsys, monkeypatch):
    """A Ctrl-C (a real SIGINT to this process) in the middle of step 2, long before the next --save-every
    state: the step finishes, a resume state of it is written, exit 130 naming it, and --resume reaches the
    losses and weights of the uninterrupted run. (Without this only the states written every --save-every
    steps survived: the run below had none to resume.) Two Ctrl-Cs stop at once, with no new state."""
    root, _ = tiny
    common = ["--steps", 4, "--batch", 2, "--lr", "1e-2", "--window", 8, "--sinks", 2, "--save-dtype", "float32",
              "--save-every", 100]
    straight, split = root / "ctrl_c_straight", root / "ctrl_c_split"
    assert train(capsys, *base_args(root, straight), *common)[0] == 0
    real_step = Trainer.train_step

    def ctrl_c_in_step_2(times):
        def step(self):
            if self.step == 2:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return real_step(self)
        return step
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_in_step_2(1))
        rc, _, err = train(capsys, *base_args(root, split), *common)
    assert rc == 130 and "stopping after this step" in err, err
    assert err.splitlines()[-1] == (f"interrupted; the last complete resume state is in {split / 'resume'}, "
                                    "continue with --resume"), err
    state, _, _ = ckpt_io.load_resume(ckpt_io.find_resume(split))
    assert state["step"] == 3 and len((split / "log.jsonl").read_text().splitlines()) == 3
    rc, _, err = train(capsys, *base_args(root, split), "--resume")
    assert rc == 0, err
    a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [0, 1, 2, 3] and [r["loss"] for r in a] == [r["loss"] for r in b]
    with safe_open(str(straight / "model.safetensors"), "pt") as f, safe_open(str(split / "model.safetensors"), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    twice = root / "ctrl_c_twice"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_in_step_2(2))
        rc, _, err = train(capsys, *base_args(root, twice), *common)
    assert rc == 130 and not ckpt_io.find_resume(twice) and len((twice / "log.jsonl").read_text().splitlines()) == 2
    assert "start over with --overwrite" in err.splitlines()[-1], err


def test_resume_may_turn_activation_checkpointing_off_and_on(tiny, capsys):
    """Activation checkpointing recomputes in the backward pass (each layer, or each layer's memory module):
    memory for time, the same numbers. A resume refused --no-activation-checkpointing ("--activation-checkpointing
    False differs from the resumed run's True", a flag that did not exist), and a run started without it could
    never get it back. Now every invocation chooses it (layer, none, memory, then the default again), and the
    losses are those of the straight run."""
    root, _ = tiny
    common = ["--steps", 4, "--batch", 2, "--lr", "1e-2", "--window", 8, "--sinks", 2, "--save-dtype", "float32"]
    straight, split = root / "ckpt_straight", root / "ckpt_split"
    assert train(capsys, *base_args(root, straight), *common)[0] == 0
    rc, _, err = train(capsys, *base_args(root, split), *common, "--stop-after", 1)
    assert rc == 0, err
    for flags, stop, saved in ((["--no-activation-checkpointing"], 2, "none"),
                               (["--activation-checkpointing", "memory"], 3, "memory"), ([], None, "layer")):
        rc, _, err = train(capsys, *base_args(root, split), "--resume", *flags,
                           *(["--stop-after", stop] if stop else []), "--save-dtype", "float32")
        assert rc == 0, err
        assert json.loads((split / "run.json").read_text())["run"]["activation_checkpointing"] == saved
    a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [0, 1, 2, 3] and [r["loss"] for r in a] == [r["loss"] for r in b]
    with safe_open(str(straight / "model.safetensors"), "pt") as f, safe_open(str(split / "model.safetensors"), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_resume_writes_the_outputs_the_uninterrupted_run_would_have(tiny, capsys):
    """--save-dtype, --infer-window / --infer-sinks and --merge were read from the resuming command line
    only: a run started with them and continued with a plain --resume (as the stop and Ctrl-C messages
    say) wrote bf16 tensors, the runtime's default window in config.json and no OUT/merged. They are now
    recorded with the run; a flag given again on the resume replaces the saved value."""
    root, _ = tiny
    outputs = ["--save-dtype", "float32", "--infer-window", 24, "--infer-sinks", 4, "--merge"]
    common = ["--steps", 2, "--window-max", 32, "--lr", "1e-2"]
    straight, split = root / "outputs_straight", root / "outputs_split"
    assert train(capsys, *base_args(root, straight), *common, *outputs)[0] == 0
    rc, _, err = train(capsys, *base_args(root, split), *common, *outputs, "--stop-after", 1)
    assert rc == 0, err
    rc, _, err = train(capsys, *base_args(root, split), "--resume")
    assert rc == 0 and "(sliding_window 24, num_attn_sinks 4) and " in err, err
    for name in ("model.safetensors", "merged/model.safetensors"):
        with safe_open(str(straight / name), "pt") as f, safe_open(str(split / name), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            assert all(g.get_tensor(k).dtype == torch.float32 and torch.equal(f.get_tensor(k), g.get_tensor(k))
                       for k in f.keys() if ".ahn." in k)
    for name in ("config.json", "merged/config.json"):
        assert json.loads((straight / name).read_text()) == json.loads((split / name).read_text())
        assert json.loads((split / name).read_text())["sliding_window"] == 24
    # given again, a flag replaces the saved value (the state is at the last step: only the outputs change)
    rc, _, err = train(capsys, *base_args(root, split), "--resume", "--save-dtype", "bf16", "--infer-window", 16)
    assert rc == 0 and "(sliding_window 16, num_attn_sinks 4) and " in err, err     # the merge kept
    with safe_open(str(split / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    # and --no-merge turns the saved --merge off (a store_true flag could not be unset on resume)
    rc, _, err = train(capsys, *base_args(root, split), "--resume", "--no-merge")
    assert rc == 0 and "(sliding_window 24, num_attn_sinks 4)\n" in err, err


def test_a_file_error_during_the_run_is_one_line_exit_1(tiny, capsys, monkeypatch):
    """The disk filling up (or OUT removed) while the run goes on: one line naming the error and the file,
    exit 1, no traceback; the resume state written before it stays."""
    import errno
    root, _ = tiny
    out = root / "disk_full"
    real_open = open

    def full_disk(path, *a, **k):
        if str(path).endswith("log.jsonl") and (out / "resume").exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", full_disk)
    rc, stdout, err = train(capsys, *base_args(root, out), "--steps", 4, "--window", 8, "--sinks", 2,
                            "--save-every", 1)
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: No space left on device: ") and "log.jsonl" in lines[-1], err
    assert "--resume" in lines[-1] and "Traceback" not in err
    assert ckpt_io.find_resume(out) is not None and not (out / "model.safetensors").exists()


def test_out_of_memory_on_the_cpu_is_one_line_exit_1(tiny, capsys, monkeypatch):
    """torch's CPU allocator fails with a plain RuntimeError, not torch.OutOfMemoryError: a long --seq-len on
    the CPU was a traceback from deep in the model; now the out-of-memory line, exit 1. Other errors (a bug)
    still raise."""
    root, _ = tiny

    def fails(e):
        def forward_student(self, *a, **k):
            raise e
        return forward_student
    alloc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                         "memory: you tried to allocate 307200000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(TrainModel, "forward_student", fails(alloc))
    rc, stdout, err = train(capsys, *base_args(root, root / "oom_cpu"), "--steps", 2, "--window", 8, "--sinks", 2)
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: out of memory (") and "lower --batch" in err, err
    monkeypatch.setattr(TrainModel, "forward_student", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main([str(a) for a in (*base_args(root, root / "bug"), "--steps", 2, "--window", 8, "--sinks", 2)])


def test_resume_refuses_another_base_of_the_same_config(tiny, capsys):
    """A resume compared only the base's config: another checkpoint of the same shape (other weights)
    resumed silently, training the memory against a different teacher. Now one line, exit 2, nothing
    written; the same base resumes."""
    root, sd = tiny
    other = root / "other_base"
    write_checkpoint(other / "model.safetensors", random_state_dict(CFG, ahn=False, dtype=torch.float32, std=0.2,
                                                                    seed=9), CFG, config_json=True)
    tiny_tokenizer(other / "tokenizer.json")
    out = root / "swapped_base"
    common = ["--steps", 3, "--window", 8, "--sinks", 2]
    assert train(capsys, *base_args(root, out), *common, "--stop-after", 1)[0] == 0
    before = (out / "log.jsonl").read_text()
    args = ["--base", other] + base_args(root, out)[2:]
    rc, stdout, err = train(capsys, *args, "--resume")
    assert rc == 2 and err.count("\n") == 1 and "is not the model the resumed run trained" in err, err
    assert (out / "log.jsonl").read_text() == before and not (out / "model.safetensors").exists()
    assert train(capsys, *base_args(root, out), "--resume")[0] == 0


def test_resume_with_other_data_or_another_base_config_says_what_to_give(tiny, capsys):
    """A resume given other data (or the same file under another --tokenizer) or a base of another config:
    the line named the problem but not what to do ("... is not the data the resumed run trained on (its
    tokens differ)"). Now it says which flags to give again, or to start a new run; nothing is written."""
    root, _ = tiny
    out = root / "resume_other_inputs"
    common = ["--steps", 3, "--window", 8, "--sinks", 2]
    assert train(capsys, *base_args(root, out), *common, "--stop-after", 1)[0] == 0
    before = (out / "log.jsonl").read_text()
    rng = random.Random(5)
    write_jsonl(root / "other_ids.jsonl", [{"input_ids": [rng.randrange(V) for _ in range(40)]} for _ in range(4)])
    other_cfg = dict(CFG, intermediate_size=48)
    other = root / "other_cfg_base"
    write_checkpoint(other / "model.safetensors", random_state_dict(other_cfg, ahn=False, dtype=torch.float32,
                                                                    std=0.2, seed=2), other_cfg, config_json=True)
    for args, needle in (
            (base_args(root, out, "other_ids.jsonl"), "is not the data the resumed run trained on (its tokens "
             "differ); give the --data (and --tokenizer) it started from, or start a new run in another --out"),
            (["--base", other] + base_args(root, out)[2:], "is not the model the resumed run trained (its config "
             "differs); give the --base it started from, or start a new run in another --out")):
        rc, stdout, err = train(capsys, *args, "--resume")
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
        assert (out / "log.jsonl").read_text() == before and not (out / "model.safetensors").exists()
    assert train(capsys, *base_args(root, out), "--resume")[0] == 0


def test_a_file_error_before_the_first_resume_state_points_to_overwrite(tiny, capsys, monkeypatch):
    """The disk filling up before the first resume state (every --save-every steps): the line said "continue
    from the last resume state with --resume", and --resume then refused (no resume state; start over with
    --overwrite), the round that the interrupt's message no longer makes. It now names --overwrite at once."""
    import errno
    root, _ = tiny
    out = root / "disk_full_early"
    real_open = open

    def full_disk(path, *a, **k):
        if str(path).endswith("log.jsonl") and (out / "log.jsonl").exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)
    args = [*base_args(root, out), "--steps", 4, "--window", 8, "--sinks", 2, "--save-every", 100]
    with monkeypatch.context() as m:
        m.setattr("builtins.open", full_disk)
        rc, _, err = train(capsys, *args)
    assert rc == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: No space left on device: ") and "--resume" not in line, err
    assert line.endswith("then start it over with --overwrite (no resume state was written yet)"), err
    assert not ckpt_io.find_resume(out)
    assert train(capsys, *args, "--overwrite")[0] == 0      # what the line says works


def test_a_resume_state_that_cannot_be_written_is_exit_1_with_resume_advice(tiny, capsys, monkeypatch):
    """The disk filling up while the resume state is written (after an earlier one): exit 1 like every
    other file error of a running job (it was exit 2, a usage error), one line naming the resume state and
    the error, the advice by what is on disk; the earlier resume state stays complete."""
    import errno
    from ahn_rt import weights as W
    root, _ = tiny
    out = root / "disk_full_resume"
    real = W.atomic_write_text
    calls = []

    def full_disk(path, text):
        if Path(path).name == "state.json" and ".resume.tmp" in str(path):
            calls.append(path)
            if len(calls) == 2:
                raise ahn_rt.AhnError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
        return real(path, text)
    monkeypatch.setattr(ckpt_io, "atomic_write_text", full_disk)
    rc, _, err = train(capsys, *base_args(root, out), "--steps", 4, "--window", 8, "--sinks", 2,
                       "--save-every", 1)
    assert rc == 1 and "Traceback" not in err and len(calls) == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot write the resume state (") and "No space left" in line, err
    assert line.endswith("then continue from the last resume state with --resume"), err
    found = ckpt_io.find_resume(out)
    assert found is not None and not list(out.glob(".resume.tmp*"))
    assert train(capsys, *base_args(root, out), "--resume")[0] == 0      # what the line says works


def test_a_model_that_cannot_be_written_at_the_end_is_exit_1_with_resume_advice(tiny, capsys, monkeypatch):
    """The disk filling up while OUT/model.safetensors (or OUT/merged) is written at the end: exit 2, a usage
    error, and no word of what to do; the resume state at the last step is complete, and --resume writes the
    outputs. Now exit 1 with the run's other file errors' line, which says so."""
    import errno
    from ahn_rt import weights as W
    root, _ = tiny
    out = root / "disk_full_model"
    real = W.atomic_write

    def full_disk(path, write):
        if Path(path).name == "model.safetensors" and "resume" not in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)
    args = [*base_args(root, out), "--steps", 2, "--window", 8, "--sinks", 2, "--merge"]
    with monkeypatch.context() as m:
        m.setattr(W, "atomic_write", full_disk)
        rc, _, err = train(capsys, *args)
    assert rc == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot write ") and "model.safetensors: No space left on device" in line, err
    assert line.endswith("then continue from the last resume state with --resume"), err
    assert not (out / "model.safetensors").exists()
    rc, _, err = train(capsys, *base_args(root, out), "--resume")      # what the line says works
    assert rc == 0 and (out / "model.safetensors").exists() and (out / "merged" / "model.safetensors").exists(), err


def test_training_prefers_expandable_segments_unless_the_user_chose(monkeypatch, tmp_path, capsys):
    """The train command asks the CUDA caching allocator for expandable segments before its first allocation
    (bench/README.md: +13% tokens/s with --activation-checkpointing memory on an H100), and leaves a setting
    of the user's alone, under either of the variables torch reads."""
    from ahn_rt.devices import prefer_expandable_segments
    from ahn_rt.devices import allocator_setting
    env = {}
    assert allocator_setting(env) is None
    assert prefer_expandable_segments(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_setting(env) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {var: "max_split_size_mb:128"}
        assert not prefer_expandable_segments(env) and env == {var: "max_split_size_mb:128"}
    # the command itself, first thing (here it stops at once: no such base)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert main(["--base", str(tmp_path / "none.safetensors"), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    main(["--base", str(tmp_path / "none.safetensors"), "--data", str(tmp_path / "d.jsonl"),
          "--out", str(tmp_path / "out")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    capsys.readouterr()
