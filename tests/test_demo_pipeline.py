"""The demo model pipeline (scripts/demo): the corpus builder is bit-reproducible and splits by file, the
passkey items sit exactly where they say, and the evaluation scores what it claims (an oracle that is
given the answer gets 100%, a uniform model log V, a real runtime model the same numbers as a hand-made
check), all on the CPU in a few seconds."""
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo"
sys.path.insert(0, str(DEMO))


def _load(name, as_name=None):
    """Load scripts/demo/<name>.py (the scripts are not a package); registered in sys.modules so that the
    scripts' own ``import longrange`` finds this very module."""
    as_name = as_name or f"demo_{name}"
    spec = importlib.util.spec_from_file_location(as_name, DEMO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = mod
    spec.loader.exec_module(mod)
    return mod


longrange = _load("longrange", "longrange")
build_corpus = _load("build_corpus")
evaluate = _load("evaluate")
train_teacher = _load("train_teacher")
make_distill_data = _load("make_distill_data")
recall_probe = _load("recall_probe")

# tolerance table: exact everywhere (hashes, ids, positions, counts) except the losses of a real model,
# which are float32/float64 sums compared at 1e-6 relative; an oracle's loss bound is analytic
# (logit margin 30: -log p <= V e^-30).


# ----------------------------------------------------------------------------------------------
# Corpus builder
# ----------------------------------------------------------------------------------------------
def _fake_stdlib(root: Path):
    """A small folder shaped like a stdlib: packages, tests, and the files the builder must skip."""
    words = ["def", "return", "self", "class", "import", "passkey", "the", "was", "value", "print"]
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = ["", "json/", "email/mime/", "test/", "test/data/"][i % 5]
        body = "\n".join(f"# {' '.join(rng.choice(words, 6))} {int(rng.integers(0, 99999))}\n"
                         f"def f{i}_{j}(self, x):\n    return x + {j}\n" for j in range(8))
        p = root / f"{sub}mod_{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body, encoding="utf-8")
    (root / "empty.py").write_text("")
    (root / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    (root / "_sysconfigdata__linux.py").write_text("build_time_vars = {}\n")
    (root / "site-packages" / "pkg").mkdir(parents=True)
    (root / "site-packages" / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")


def test_corpus_builder_is_deterministic_and_splits_by_file(tmp_path):
    src = tmp_path / "stdlib"
    _fake_stdlib(src)
    a = build_corpus.build(src, tmp_path / "a", vocab_size=300, heldout_permille=200, distill_permille=200,
                           log=lambda *_: None)
    b = build_corpus.build(src, tmp_path / "b", vocab_size=300, heldout_permille=200, distill_permille=200,
                           log=lambda *_: None)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for name, digest in a["sha256"].items():
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest
    assert a["skipped"] == {"build-specific": ["_sysconfigdata__linux.py"], "empty": ["empty.py"],
                            "not UTF-8": ["latin1.py"]}
    paths = {k: v["paths"] for k, v in a["splits"].items()}
    every = sorted(p for v in paths.values() for p in v)
    assert len(every) == 40 and len(set(every)) == 40 and not any("site-packages" in p for p in every)
    for split, ps in paths.items():
        assert ps == sorted(ps) and ps, split
        assert all(build_corpus.split_of(p, 200, 200) == split for p in ps)

    # the .bin files hold each file's tokens followed by <|endoftext|>, and decode back to the sources
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    eot = a["special_tokens"]["<|endoftext|>"]
    assert [a["special_tokens"][s] for s in build_corpus.SPECIAL_TOKENS] == [0, 1, 2]
    ids = np.fromfile(tmp_path / "a" / "heldout.bin", dtype="<u2")
    assert ids.size == a["splits"]["heldout"]["tokens"]
    docs = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]
    assert len(docs) == len(paths["heldout"])
    for doc, rel in zip(docs, paths["heldout"]):
        assert tok.decode(doc[:-1].tolist()) == (src / rel).read_text(encoding="utf-8")
    # digits are single tokens, so a 5-digit passkey is 5 tokens
    assert len(tok.encode("48213", add_special_tokens=False).ids) == 5
    assert sorted(a["digit_tokens"]) == list("0123456789")
    # the passkey templates are recorded in the manifest (the GPU side needs no tokenizer library)
    assert longrange.Templates.from_data(tmp_path / "a") == longrange.Templates.from_tokenizer(tmp_path / "a")


# ----------------------------------------------------------------------------------------------
# Long-range items
# ----------------------------------------------------------------------------------------------
T = longrange.Templates(statement=(1, 2, 3), question=(4, 5, 6, 7), newline=(8,), digits=tuple(range(10, 20)))


@pytest.mark.parametrize("L,distance", [(200, 14), (200, 60), (200, 123), (512, 300), (512, 440)])
def test_passkey_lands_at_the_requested_distance(L, distance):
    filler = np.arange(1000, 1000 + L, dtype=np.int64)          # distinguishable corpus tokens
    for seed in range(5):
        ids, it = longrange.insert_passkey(filler, L, distance, np.random.default_rng(seed), T, min_start=10)
        assert ids.shape == (L,) and ids.dtype == np.int64
        assert it.distance == distance == it.answer_pos - it.key_pos
        assert tuple(ids[it.key_pos:it.key_pos + 5]) == it.digits == tuple(ids[a] for a in it.answer_positions)
        assert "".join(str(T.digits.index(d)) for d in it.digits) == it.text
        assert tuple(ids[it.key_pos - 3:it.key_pos]) == T.statement and ids[it.key_pos + 5] == 8
        assert tuple(ids[it.answer_pos - 4:it.answer_pos]) == T.question
        assert it.key_pos - 3 >= 10 and it.answer_pos + 5 <= L
        rest = ids[ids >= 1000]                                  # the corpus tokens, in order, none lost between
        assert np.array_equal(rest, filler[:rest.size])
        assert rest.size == L - T.statement_len - min(T.question_len, L - it.answer_pos + len(T.question))


def test_distill_data_a_failed_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A write that failed (a full disk) was an OSError traceback and left OUT.tmp, half-written, beside --out;
    now an AhnError (exit 1 through the scripts' run), the old --out kept and no temporary left."""
    import errno
    from ahn_rt.errors import AhnError
    tokens = np.random.default_rng(0).integers(20, 60, size=5000).astype(np.uint16)
    out = tmp_path / "d.jsonl"
    out.write_text("old\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(make_distill_data.os, "replace", full)
    with pytest.raises(AhnError, match="No space left on device") as e:
        make_distill_data.write_jsonl(out, longrange.SequenceSampler(tokens, 256, T, seed=4), 3)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"] and out.read_text() == "old\n"


def test_distill_data_weights_the_answer_digits(tmp_path):
    """--answer-weight puts its weight on exactly the 5 answer digits of each passkey record (and writes no
    weights at 1, so the default file is unchanged); the trainer's reader accepts the file."""
    from ahn_rt.train.data import BudgetSpec, load_dataset
    tokens = np.random.default_rng(0).integers(20, 60, size=5000).astype(np.uint16)

    def sampler():
        return longrange.SequenceSampler(tokens, 256, T, seed=4, passkey_frac=0.5, dist_min=40)
    plain = make_distill_data.write_jsonl(tmp_path / "plain.jsonl", sampler(), 12)
    heavy = make_distill_data.write_jsonl(tmp_path / "heavy.jsonl", sampler(), 12, answer_weight=50.0)
    assert "loss_weights" not in (tmp_path / "plain.jsonl").read_text()
    assert plain["with_passkey"] == heavy["with_passkey"] > 0 and plain["sha256"] != heavy["sha256"]
    ref = sampler()
    for line, plain_line in zip((tmp_path / "heavy.jsonl").read_text().splitlines(),
                                (tmp_path / "plain.jsonl").read_text().splitlines()):
        rec, ids_item = json.loads(line), ref.sample()
        assert rec["input_ids"] == ids_item[0].tolist() == json.loads(plain_line)["input_ids"]
        item = ids_item[1]
        if item is None:
            assert "loss_weights" not in rec
        else:
            heavy_at = [i for i, w in enumerate(rec["loss_weights"]) if w != 1]
            assert heavy_at == list(item.answer_positions) and rec["loss_weights"][heavy_at[0]] == 50.0
    d = load_dataset(tmp_path / "heavy.jsonl", vocab_size=64, seq_len=256, budget=BudgetSpec(fixed=(16, 4)))
    assert len(d) == 12 and d.weights is not None and float(d.weights.max()) == 50.0
    # --text-weight 0: the answer digits alone carry loss; a record without a passkey carries none
    make_distill_data.write_jsonl(tmp_path / "answers.jsonl", sampler(), 12, answer_weight=1.0, text_weight=0.0)
    ref = sampler()
    for line in (tmp_path / "answers.jsonl").read_text().splitlines():
        rec, (_, item) = json.loads(line), ref.sample()
        nonzero = [i for i, w in enumerate(rec["loss_weights"]) if w != 0]
        assert nonzero == ([] if item is None else list(item.answer_positions))
    # answer_end: the newline after the digits weighs as they do (the model learns where the number ends);
    # the sampler puts the question last, so some answers end the sequence and have no newline to weigh
    make_distill_data.write_jsonl(tmp_path / "end.jsonl", sampler(), 12, answer_weight=50.0, answer_end=True)
    ref, ended = sampler(), 0
    for line in (tmp_path / "end.jsonl").read_text().splitlines():
        rec, (ids, item) = json.loads(line), ref.sample()
        if item is not None:
            heavy_at = [i for i, w in enumerate(rec["loss_weights"]) if w == 50.0]
            stop = item.answer_positions.stop
            assert heavy_at == list(item.answer_positions) + ([stop] if stop < len(ids) else [])
            if stop < len(ids):
                assert ids[stop] == T.newline[0]
                ended += 1
    assert ended > 0


def test_passkey_limits_and_seeded_sets():
    filler = np.arange(1000, 1200, dtype=np.int64)
    assert T.min_distance() == 10 and T.max_distance(200, 10) == 200 - 5 - 13
    with pytest.raises(ValueError):
        longrange.insert_passkey(filler, 200, T.max_distance(200, 10) + 1, np.random.default_rng(0), T, min_start=10)
    with pytest.raises(ValueError):
        longrange.insert_passkey(filler, 200, 9, np.random.default_rng(0), T, min_start=10)
    ids, it = longrange.insert_passkey(filler, 200, T.max_distance(200, 10), np.random.default_rng(0), T, min_start=10)
    assert it.answer_pos + 5 == 200 and it.key_pos == 13
    tokens = np.arange(5000, dtype=np.uint16) % 900 + 100
    a = longrange.eval_passkey_sequences(tokens, 256, [50, 200], 3, T, seed=7, min_start=10)
    b = longrange.eval_passkey_sequences(tokens, 256, [50, 200], 3, T, seed=7, min_start=10)
    for d in (50, 200):
        assert [it for _, it in a[d]] == [it for _, it in b[d]]
        assert all(it.distance == d and np.array_equal(x, y) for (x, it), (y, _) in zip(a[d], b[d]))
    s = longrange.SequenceSampler(tokens, 256, T, seed=1, passkey_frac=1.0, dist_min=100, dist_max=150, min_start=10)
    items = [s.sample()[1] for _ in range(50)]
    assert all(100 <= it.distance <= 150 for it in items)
    assert longrange.SequenceSampler(tokens, 256, T, seed=1, passkey_frac=0.0).sample()[1] is None
    texts = longrange.eval_text_sequences(tokens, 256, 4)
    assert [x[0] for x in texts] == [tokens[0], tokens[1581], tokens[3163], tokens[4744]]


def test_templates_from_a_real_tokenizer(tmp_path):
    tok = build_corpus.train_tokenizer(["# passkey: 123\n# the passkey was: 123\nx = 0\n" * 20,
                                        "def f(self):\n    return 456789\n" * 20], 300)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    t = longrange.Templates.from_tokenizer(tmp_path)
    assert len(t.digits) == 10 and len(set(t.digits)) == 10
    ids, it = longrange.insert_passkey(np.full(300, t.newline[0]), 300, 100, np.random.default_rng(3), t)
    text = tok.decode(ids.tolist())
    assert f"\n# passkey: {it.text}\n" in text and f"\n# the passkey was: {it.text}\n" in text


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
V = 32


def _oracle(ids, margin=30.0):
    """Logits that put ``margin`` on the true next token (a model given the answer)."""
    ids = torch.as_tensor(np.asarray(ids))
    logits = torch.zeros(ids.numel(), V)
    logits[torch.arange(ids.numel() - 1), ids[1:]] = margin
    return logits


def _passkeys(L=160, n=4, distances=(20, 90)):
    tokens = (np.arange(3000) * 7 % 11 + 20).astype(np.uint16)          # ids 20..30, never a digit
    return longrange.eval_passkey_sequences(tokens, L, distances, n, T, seed=3, min_start=10), tokens


def test_scoring_oracle_uniform_and_a_fixed_guess():
    seqs, tokens = _passkeys()
    text = longrange.eval_text_sequences(tokens, 160, 3)
    res = evaluate.evaluate_mode(_oracle, text, seqs, start=40, edges=(100,))
    assert res["text_tokens"] == 3 * (160 - 1 - 40)
    assert 0 <= res["text_loss"] <= V * math.exp(-30)
    assert [(b["from"], b["to"], b["tokens"]) for b in res["text_loss_by_position"]] == [(40, 100, 180), (100, 159, 177)]
    for d, p in res["passkey"].items():
        assert (p["n"], p["exact"], p["recall"], p["digit_acc"]) == (4, 4, 1.0, 1.0)
        assert 0 <= p["answer_loss"] <= V * math.exp(-30)
        assert (p["exact_end"], p["end_n"]) == (4, 4)

    def runs_on(ids):           # the answer's digits, then another digit instead of the newline that ends it
        lg = _oracle(ids)
        lg[:-1][torch.as_tensor(np.asarray(ids[1:])) == T.newline[0], T.digits[3]] = 60.0
        return lg
    res = evaluate.evaluate_mode(runs_on, text, seqs, start=40)
    for p in res["passkey"].values():
        assert (p["exact"], p["exact_end"], p["end_n"]) == (4, 0, 4)
    md = evaluate.markdown({"meta": {"seq_len": 160, "window": 24, "sinks": 4, "n_text": 3, "dtype": "float32",
                                     "device": "cpu", "backend": "test"}, "modes": {"ahn": res}})
    assert "4/4 = 100%" in md and "ended 0/4" in md

    res = evaluate.evaluate_mode(lambda ids: torch.zeros(len(ids), V), text, seqs, start=40)
    assert res["text_loss"] == pytest.approx(math.log(V), rel=1e-12)
    assert all(p["exact"] == 0 and p["answer_loss"] == pytest.approx(math.log(V)) for p in res["passkey"].values())

    def always_seven(ids):      # answers the digit "7" everywhere: right exactly where the passkey has a 7
        lg = torch.zeros(len(ids), V)
        lg[:, T.digits[7]] = 1.0
        return lg
    res = evaluate.evaluate_mode(always_seven, text, seqs, start=40)
    for d, items in seqs.items():
        sevens = sum(it.text.count("7") for _, it in items)
        assert res["passkey"][str(d)]["digit_acc"] == sevens / (5 * len(items))
        assert res["passkey"][str(d)]["exact"] == sum(it.text == "77777" for _, it in items)


def test_greedy_agreement_rule():
    assert evaluate.greedy_agrees([1, 2, 3], [1, 2, 3], [1, 2, 3])
    assert evaluate.greedy_agrees([1, 9, 5], [1, 9, 3], [1, 2, 3])      # left the truth at 9: rest not comparable
    assert not evaluate.greedy_agrees([1, 2, 5], [1, 2, 3], [1, 2, 3])
    assert not evaluate.greedy_agrees([4, 2, 3], [1, 2, 3], [1, 2, 3])


def test_evaluation_through_the_runtime_on_a_tiny_random_model():
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.runtime import from_state_dict
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=1)
    seqs, tokens = _passkeys(L=160, n=2, distances=(20, 90))
    text = longrange.eval_text_sequences(tokens, 160, 2)
    S, W = 4, 24
    out = {}
    for mode in ("full", "swa", "ahn"):
        kw = {} if mode == "full" else {"window": W, "sinks": S}
        fwd = evaluate.RuntimeForward(from_state_dict(cfg, sd, mode=mode, dtype="float32", **kw))
        out[mode] = res = evaluate.evaluate_mode(fwd, text, seqs, start=S + W)
        # the same numbers by hand, from a fresh session per sequence
        ref_sum = ref_n = 0.0
        for ids in text:
            with torch.inference_mode():
                lg = from_state_dict(cfg, sd, mode=mode, dtype="float32", **kw).new_session().forward(ids.tolist())
            ce = torch.nn.functional.cross_entropy(lg[S + W:-1].double(), torch.as_tensor(ids[S + W + 1:]).long(),
                                                   reduction="sum")
            ref_sum, ref_n = ref_sum + float(ce), ref_n + (len(ids) - 1 - S - W)
        assert res["text_loss"] == pytest.approx(ref_sum / ref_n, rel=1e-6)
        for d, items in seqs.items():
            exact = 0
            for ids, it in items:
                lg = fwd(ids[:it.answer_pos + 5])
                exact += all(int(lg[p - 1].argmax()) == ids[p] for p in it.answer_positions)
            assert res["passkey"][str(d)]["exact"] == exact
            assert res["passkey"][str(d)]["greedy_check"]["agree"]
        # a runtime model that is given the answer scores 100%
        cheat = evaluate.evaluate_mode(lambda ids: fwd(ids) + _oracle(ids, 1e3), text, seqs, start=S + W)
        assert all(p["recall"] == 1.0 for p in cheat["passkey"].values())
    assert out["ahn"]["text_loss"] != out["swa"]["text_loss"]          # the random memory is read
    rep = {"meta": {"seq_len": 160, "window": W, "sinks": S, "n_text": 2, "dtype": "float32", "device": "cpu",
                    "backend": "test"}, "modes": out, "gap_recovered": evaluate.gap_recovered(out)}
    md = evaluate.markdown(rep)
    assert "| full |" in md and "| 20 (inside the window) |" in md and "| 90 |" in md
    # --n-passkey 0: the distances have no sequences; the table leaves recall out instead of failing
    fwd = evaluate.RuntimeForward(from_state_dict(cfg, sd, mode="full", dtype="float32"))
    none = evaluate.evaluate_mode(fwd, text, {20: []}, start=S + W)
    assert none["passkey"]["20"]["n"] == 0
    md = evaluate.markdown(dict(rep, modes={m: none for m in out}, gap_recovered=0.0))
    assert "| full |" in md and "Passkey recall" not in md


def test_gap_recovered():
    r = {"full": {"text_loss": 1.0}, "swa": {"text_loss": 2.0}, "ahn": {"text_loss": 1.25}}
    assert evaluate.gap_recovered(r) == pytest.approx(0.75)
    r["swa"]["text_loss"] = 0.9
    assert evaluate.gap_recovered(r) is None


def test_gap_anatomy_classes_at_the_window_and_sink_edges():
    """A bigram's copy source q (the position of its second token) is visible to a query at t when q < S or
    q >= t - W + 1. Worked by hand for W = 3, S = 1: (9, 9) at t = 4, 5 repeats inside the window; (1, 2) at
    t = 7 was last seen with its source at 2 < 7 - 3 + 1 = 5 (beyond), at t = 10 with its source at 8 = 10 - 3
    + 1 (the window's oldest slot: visible). Off by one at that edge (W = 2) it is beyond; with S = 3 the source
    at 2 sits in the sinks."""
    gap_anatomy = _load("gap_anatomy")
    ids = np.array([5, 1, 2, 9, 9, 9, 9, 1, 2, 7, 1, 2])
    assert gap_anatomy.classify(ids, 3, 1).tolist() == [2, 2, 2, 2, 0, 0, 2, 1, 2, 2, 0]
    assert gap_anatomy.classify(ids, 2, 1).tolist()[10] == 1
    assert gap_anatomy.classify(ids, 3, 3).tolist()[7] == 0
    # by trigrams only (9, 9, 9) repeats (at t = 5, its source 5 in the window)
    assert gap_anatomy.classify(ids, 3, 1, 3).tolist() == [2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2]


def test_gap_anatomy_shares():
    """Two sequences; positions before ``start`` are left out. The gap (swa - full) sits on the beyond
    positions alone, where ahn recovers half of it: gap share 100% there, recovered 50% there and overall; the
    visible class has no gap, so no recovered share."""
    gap_anatomy = _load("gap_anatomy")
    cls = [np.array([1, 0, 1, 2, 0]), np.array([1, 1, 2, 0, 1])]
    full = [np.zeros(5), np.zeros(5)]
    swa = [(c == 1).astype(float) * 2.0 for c in cls]
    swa[0][0] = 100.0                        # before start: must not count
    ahn = [x / 2 for x in swa]
    rows = gap_anatomy.anatomy({"full": full, "swa": swa, "ahn": ahn}, cls, start=1)
    assert rows["all"]["positions"] == 8 and rows["beyond"]["positions"] == 3
    assert rows["beyond"]["gap_share"] == pytest.approx(1.0) and rows["unseen"]["gap_share"] == 0.0
    assert rows["beyond"]["recovered"] == pytest.approx(0.5) and rows["all"]["recovered"] == pytest.approx(0.5)
    assert rows["visible"]["recovered"] is None
    assert rows["beyond"]["loss_swa"] == pytest.approx(2.0) and rows["all"]["loss_full"] == 0.0


# ----------------------------------------------------------------------------------------------
# Teacher shape and the one-command script
# ----------------------------------------------------------------------------------------------
def test_default_teacher_shape_fits_the_shipping_limit():
    d = train_teacher.SHAPE_DEFAULTS
    cfg = train_teacher.model_config(4096, d["hidden"], d["layers"], d["heads"], d["kv_heads"], d["mlp"],
                                     d["rope_theta"], 4096, eos=[2, 0], bos=0, head_dim=d["head_dim"])
    size = train_teacher.shape_bytes(cfg)
    assert size["tensor_bytes"] + 64 * 1024 <= 15 * 2**20          # + a generous safetensors header
    a = train_teacher.init_base(cfg, 0)
    b = train_teacher.init_base(cfg, 0)
    assert all(torch.equal(a[k], b[k]) for k in a) and sum(v.numel() for v in a.values()) == size["base_params"]
    assert train_teacher.lr_at(0, 1.0, 100, 10, 0.1) == pytest.approx(0.1)
    assert train_teacher.lr_at(99, 1.0, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_run_gpu_script_parses():
    subprocess.run(["bash", "-n", str(DEMO / "run_gpu.sh")], check=True)
    subprocess.run(["bash", "-n", str(DEMO / "run_recall.sh")], check=True)
    subprocess.run(["bash", "-n", str(DEMO / "run_answer_end.sh")], check=True)
    subprocess.run(["bash", "-n", str(DEMO / "compare_variants.sh")], check=True)


def test_the_scripts_default_to_the_shipped_window_and_sinks():
    """run_gpu.sh, run_recall.sh and run_answer_end.sh with no overrides reproduce weights/demo
    (scripts/demo/README.md): their full-size window and sinks are the shipped config's, so a change of either
    is caught here."""
    cfg = json.loads((ROOT / "weights" / "demo" / "config.json").read_text())
    for script in ("run_gpu.sh", "run_recall.sh", "run_answer_end.sh"):
        text = (DEMO / script).read_text()
        full = [line for line in text.splitlines() if "WIN=${WINDOW:-" in line]
        assert len(full) == 1, (script, full)
        win = re.search(r"WIN=\$\{WINDOW:-(\d+)\}", full[0])
        sinks = re.search(r"SINKS=(\d+)", full[0])
        assert win and sinks, (script, full[0])
        assert (int(win.group(1)), int(sinks.group(1))) == (cfg["sliding_window"], cfg["num_attn_sinks"]), script
    # and run_gpu.sh's teacher has the shipped heads (train_teacher.py's own default is the earlier 64)
    shape = re.search(r'T_SHAPE <<< "\$\{TEACHER_ARGS---head-dim (\d+)\}"', (DEMO / "run_gpu.sh").read_text())
    assert shape and int(shape.group(1)) == cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])


def test_variants_table(tmp_path, capsys):
    """compare_variants.sh's table: one row per memory with its AHN parameter count (from the run's AHN-only
    weights) and its steps (the resume step a time guard merged from, else the run's planned steps), the
    full / swa references from the first run, the recovered gap; a missing evaluation is one line and
    exit 2."""
    from safetensors.torch import save_file
    table = _load("variants_table")

    def ev(loss_ahn, gap, exact, pipeline):
        res = lambda loss, ex: {"text_loss": loss, "text_loss_by_position": [{"from": 80, "to": 256, "loss": loss}],  # noqa: E731
                                "passkey": {"200": {"exact": ex, "n": 4, "digit_acc": ex / 4}}}
        return {"meta": {"seq_len": 512, "sinks": 16, "window": 64, "dtype": "bfloat16", "device": "cpu",
                         "n_text": 2},
                "modes": {"full": res(2.0, 4), "swa": res(3.0, 0), "ahn": res(loss_ahn, exact)}, "gap_recovered": gap,
                "pipeline": pipeline}

    stopped = {"distill_run": {"run": {"steps": 600}}, "distill_partial": {"step": 250, "planned_steps": 600}}

    runs = []
    for name, loss, gap, n, pipe in (("gdn", 2.5, 0.5, 10, {"distill_run": {"run": {"steps": 40}}}), ("mamba2", 2.75, 0.25, 6, stopped)):
        (tmp_path / "out" / name / "eval").mkdir(parents=True)
        (tmp_path / "out" / name / "eval" / "eval.json").write_text(json.dumps(ev(loss, gap, 1, pipe)))
        (tmp_path / "work" / name / "ahn").mkdir(parents=True)
        save_file({"a": torch.zeros(n), "b": torch.zeros(2, 3)}, str(tmp_path / "work" / name / "ahn" / "model.safetensors"))
        runs += ["--run", f"{name}={tmp_path / 'work' / name}"]
    out = tmp_path / "variants.md"
    assert table.main(runs + ["--eval-root", str(tmp_path / "out"), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| memory | AHN params | steps | loss | t 80–255 | gap recovered | passkey @ 200 |")
    assert rows[1].startswith("| full (no memory) | – | – | 2.0000 |") and rows[2].startswith("| swa (no memory) |")
    assert rows[3] == "| ahn-gdn | 16 | 40 | 2.5000 | 2.5000 | 50.0% | 1/4 (25%) |"
    assert rows[4] == "| ahn-mamba2 | 12 | 250 of 600 | 2.7500 | 2.7500 | 25.0% | 1/4 (25%) |"
    # a run evaluated without passkeys (--n-passkey 0): no passkey columns
    for name in ("gdn", "mamba2"):
        f = tmp_path / "out" / name / "eval" / "eval.json"
        e = json.loads(f.read_text())
        for r in e["modes"].values():
            r["passkey"] = {"200": {"exact": 0, "n": 0, "recall": None, "digit_acc": None}}
        f.write_text(json.dumps(e))
    assert table.main(runs + ["--eval-root", str(tmp_path / "out"), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].endswith("| gap recovered |") and rows[3] == "| ahn-gdn | 16 | 40 | 2.5000 | 2.5000 | 50.0% |"
    assert table.main(runs + ["--run", f"dn={tmp_path / 'work' / 'dn'}", "--eval-root", str(tmp_path / "out"),
                              "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no evaluation for dn") and "\n" not in err


def test_recall_probe_heads_on_a_tiny_random_model():
    """The copy-head diagnostic: one row per (layer, head), attention weights, ranks and cosines within their
    ranges, and the model left as it was (the patched layer is restored)."""
    from ahn_rt.config import parse_config
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.train.model import TrainModel
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    config = parse_config(cfg, "test")
    model = TrainModel(config, random_state_dict(cfg, ahn=False, dtype=torch.float32, seed=1), base_dtype=torch.float32)
    seqs, _ = _passkeys(L=160, n=2, distances=(90,))
    ids = torch.from_numpy(seqs[90][0][0])[None]
    before = model.forward_teacher(ids)
    rows = recall_probe.copy_heads(model, config, seqs[90], W=24)
    assert [(r["layer"], r["head"]) for r in rows] == [(i, h) for i in range(config.num_layers) for h in range(2)]
    for r in rows:
        assert 0 <= r["attention_on_source"] <= 1 and 0 <= r["source_rank"] < 160
        assert -1 <= r["source_cosine"] <= 1 and 0 <= r["mean_abs_cosine"] <= 1
    assert torch.equal(model.forward_teacher(ids), before)


def test_recall_probe_trains_only_the_chosen_heads():
    """recall_probe train --layers 1 --heads 1: of layer 1's memory only head 1's rows move (the output norm,
    shared by the heads, stays too); layer 0's memory stays; without --heads every head of layer 1 moves."""
    from types import SimpleNamespace

    from ahn_rt.config import parse_config
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.train.model import TrainModel
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    config = parse_config(cfg, "test")
    base = random_state_dict(cfg, ahn=False, dtype=torch.float32, seed=1)
    tokens = (np.arange(6000) * 7 % 11 + 20).astype(np.uint16)
    moved = {}
    for heads in ("1", ""):
        torch.manual_seed(0)
        model = TrainModel(config, base, base_dtype=torch.float32)
        start = {k: v.clone() for k, v in model.ahn_state_dict().items()}
        sampler = longrange.SequenceSampler(tokens, 160, T, seed=1, passkey_frac=1.0, dist_min=60)
        a = SimpleNamespace(layers="1", heads=heads, lr=1e-2, batch=2, seq_len=160, window=24, sinks=4, steps=3,
                            answer_weight=10.0, text_weight=1.0)
        recall_probe.train(model, sampler, a, log=lambda *_: None)
        after = model.ahn_state_dict()
        moved[heads] = {(k.split(".fn.")[1], h) for k in after if ".layers.1." in k and after[k].dim() and
                        after[k].shape[0] == 2 for h in range(2) if not torch.equal(after[k][h], start[k][h])}
        assert all(torch.equal(after[k], start[k]) for k in after if ".layers.0." in k)
        norm = "model.layers.1.ahn.fn.o_norm.weight"
        assert torch.equal(after[norm], start[norm]) == bool(heads)
    assert moved["1"] and {h for _, h in moved["1"]} == {1}
    assert {h for _, h in moved[""]} == {0, 1} and {n for n, _ in moved["1"]} <= {n for n, _ in moved[""]}



@pytest.mark.parametrize("window,sinks", [(0, 32), (512, -1), (2**31 - 1, 32)])
def test_merge_resume_refuses_a_window_no_loader_takes_before_writing(tmp_path, window, sinks):
    """merge_resume --window 0 (or --sinks -1, or more cache slots than a state holds) wrote config.json with
    that value over the run's outputs, exit 0: a model no loader takes. Now one line, exit 2, nothing
    touched."""
    base, run, data = ROOT / "weights" / "demo", tmp_path / "run", tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f(x):\n    return x + {i}\n" * 12}) + "\n" for i in range(2)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run_(*args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    r = run_("-m", "ahn_rt.train", "--base", base, "--data", data, "--out", run, "--steps", 1, "--seq-len", 64,
             "--window", 8, "--sinks", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = run_(DEMO / "merge_resume.py", "--base", base, "--run", run, "--window", window, "--sinks", sinks)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --"), r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (run / "merged").exists()


@pytest.mark.parametrize("other", ["same config, other weights", "another shape"])
def test_merge_resume_refuses_a_base_the_run_did_not_train_on(tmp_path, capsys, other):
    """merge_resume merged the run's memory onto whatever --base it was given: a base of the same config
    with other weights gave a merged model whose memory was trained for another (exit 0, nothing said), one
    of another shape an "internal:" shape error. Now one line naming --base, exit 2, nothing written (the
    check the trainer's --resume makes on the state's base_config / base_fingerprint)."""
    from ahn_rt.init_weights import random_state_dict
    from ahn_rt.train.__main__ import main as train_main
    from ahn_rt.weights import write_checkpoint
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
               tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512, hidden_act="silu",
               rms_norm_eps=1e-6, torch_dtype="float32")
    write_checkpoint(tmp_path / "base" / "model.safetensors",
                     random_state_dict(cfg, ahn=False, dtype=torch.float32, std=0.2, seed=2), cfg, config_json=True)
    cfg2 = cfg if other.startswith("same") else dict(cfg, hidden_size=48)
    write_checkpoint(tmp_path / "other" / "model.safetensors",
                     random_state_dict(cfg2, ahn=False, dtype=torch.float32, std=0.2, seed=3), cfg2, config_json=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [(7 * i + j) % 97 for j in range(40)]}) + "\n" for i in range(3)))
    run = tmp_path / "run"
    assert train_main(["--base", str(tmp_path / "base"), "--data", str(data), "--out", str(run), "--steps", "2",
                       "--stop-after", "1", "--window", "8", "--sinks", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    merge_resume = _load("merge_resume")
    before = sorted(p.name for p in run.iterdir())
    rc = merge_resume.main(["--base", str(tmp_path / "other"), "--run", str(run), "--window", "8", "--sinks", "2"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: --base ") and "trained" in err, err
    assert sorted(p.name for p in run.iterdir()) == before and not (run / "merged").exists()
    assert merge_resume.main(["--base", str(tmp_path / "base"), "--run", str(run), "--window", "8", "--sinks", "2"]) == 0
    assert (run / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("what", ["missing", "empty folder"])
def test_merge_resume_without_a_resume_state_is_a_usage_error(tmp_path, capsys, what):
    """A --run that holds no resume state printed a bare "[merge_resume] ..." line and exited 1, as if the
    merge had failed at run time; now "error: --run ...", what to give, exit 2, like its other mistakes."""
    run = tmp_path / "run"
    if what == "empty folder":
        run.mkdir()
    rc = _load("merge_resume").main(["--base", str(ROOT / "weights" / "demo"), "--run", str(run),
                                     "--window", "8", "--sinks", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --run {run} holds no resume state"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if what == "empty folder" else [])
