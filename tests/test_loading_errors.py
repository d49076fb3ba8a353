"""Every bad input to ahn_rt.load raises ahn_rt.AhnError (a ValueError) with a one-line message that names the
problem (path, key, shapes, field). Pickle checkpoints are refused without being unpickled."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ahn_rt
from checkpoints import Spec, ahn_only, base, merged, save_ahn_only, scratch, write_json

SPEC = Spec("qwen2", tied=False)
SPEC3 = Spec("qwen3", tied=False)
W, S = 4, 1

# tolerance table (everything not listed is compared exactly)
# A session after a refused forward, fed 7 + 5 tokens, vs one fresh call over all 12 (run_feeds): the same
# function in another rounding order (docs/semantics.md §2: 1e-5 in float32; test_ahn_rules' RTOL_SELF).
RTOL_UNTOUCHED = 1e-5


def expect_error(*args, must_name=(), **kw):
    """Call ahn_rt.load, expect AhnError with a one-line message containing every string in must_name."""
    with pytest.raises(ahn_rt.AhnError) as ei:
        ahn_rt.load(*args, **kw)
    msg = str(ei.value)
    print("AhnError:", msg)
    assert isinstance(ei.value, ValueError)
    assert msg.strip(), "empty message"
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    for s in must_name:
        assert s in msg, f"message does not name {s!r}: {msg!r}"
    return msg


def copy_folder(src, name):
    dst = scratch(name)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst)
    return dst


def test_ahn_error_is_value_error():
    assert issubclass(ahn_rt.AhnError, ValueError)


# --------------------------------------------------------------------------------------------- files
def test_missing_path():
    path = os.path.join(scratch("missing"), "no_such_model")
    expect_error(path, must_name=("no_such_model",))


def test_missing_ahn_path():
    path = os.path.join(scratch("missing-ahn"), "no_such_ahn")
    expect_error(base(SPEC), ahn=path, window=W, sinks=S, mode="ahn", must_name=("no_such_ahn",))


def test_folder_without_weights():
    d = scratch("noweights")
    shutil.copy(os.path.join(base(SPEC), "config.json"), d)
    expect_error(d)


def test_empty_folder():
    expect_error(scratch("empty"))


def test_missing_or_empty_path_says_what_to_give():
    """The message names the problem and what to do (it was "weights not found: PATH", "AHN checkpoint not
    found: PATH", "no model.safetensors ... in PATH" and nothing more)."""
    hint = "give a .safetensors file or"
    expect_error(os.path.join(scratch("missing"), "no_such_model"), must_name=("weights not found", hint))
    expect_error(base(SPEC), ahn=os.path.join(scratch("missing-ahn"), "no_such_ahn"), window=W, sinks=S, mode="ahn",
                 must_name=("AHN checkpoint not found", hint))
    expect_error(scratch("empty"), must_name=("no model.safetensors", hint))


@pytest.mark.parametrize("where", ["weights", "ahn"])
def test_not_a_file_nor_a_folder(where):
    # /dev/null and a pipe are neither: they used to be read as folders (NotADirectoryError)
    fifo = os.path.join(scratch("fifo"), "model.safetensors")
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        if where == "weights":
            expect_error(path, must_name=(path, "neither a .safetensors file nor a checkpoint folder"))
        else:
            expect_error(base(SPEC), ahn=path, window=W, sinks=S, mode="ahn",
                         must_name=("AHN checkpoint", path, "neither a .safetensors file nor a checkpoint folder"))


def test_ahn_only_checkpoint_as_weights():
    # what a training run writes (model.safetensors with only model.layers.N.ahn.* and a config), as a
    # folder, as its file, and without any config
    folder = ahn_only(SPEC, W, S)
    f = os.path.join(folder, "model.safetensors")
    bare = os.path.join(scratch("ahn-bare"), "ahn.safetensors")
    shutil.copy(f, bare)
    for path in (folder, f, bare):
        msg = expect_error(path, must_name=(path, "AHN-only checkpoint", "--weights", "--ahn"))
        assert "missing" not in msg
    assert ahn_rt.load(base(SPEC), ahn=folder, window=W, sinks=S).config.mode == "ahn"   # the right way works


def test_truncated_safetensors():
    d = copy_folder(base(SPEC), "truncated")
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    expect_error(d)


def test_truncated_shard():
    d = copy_folder(base(SPEC, shard=True), "truncated-shard")
    shard = sorted(x for x in os.listdir(d) if x.startswith("model-"))[-1]
    with open(os.path.join(d, shard), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(d, shard)) - 16)
    expect_error(d)


def test_missing_shard():
    d = copy_folder(base(SPEC, shard=True), "missing-shard")
    shard = sorted(x for x in os.listdir(d) if x.startswith("model-"))[1]
    os.remove(os.path.join(d, shard))
    expect_error(d, must_name=(shard,))


@pytest.mark.parametrize("index", [[], {"weight_map": ["x.safetensors"]}, {"metadata": {}},
                                   "null-shard", "int-shard"])
def test_malformed_shard_index(index):
    """A model.safetensors.index.json that is JSON but not a shard index (a list, a weight_map that is no
    object, a shard name of null or 3): one line naming the index (it was an AttributeError or TypeError
    traceback out of .get / .values / sorted)."""
    d = copy_folder(base(SPEC, shard=True), "bad-index")
    path = os.path.join(d, "model.safetensors.index.json")
    if isinstance(index, str):
        good = json.load(open(path))
        first = sorted(good["weight_map"])[0]
        good["weight_map"][first] = None if index == "null-shard" else 3
        index = good
    write_json(path, index)
    expect_error(d, must_name=("model.safetensors.index.json", "weight_map"))


def test_tensor_stored_in_two_shards():
    """Two shards that both hold a tensor (a stale shard of an earlier export): the copy in the later file
    was used, silently, whatever the index said. Now refused, naming the tensor and both files."""
    d = copy_folder(base(SPEC, shard=True), "dup-shard")
    first, second = sorted(x for x in os.listdir(d) if x.startswith("model-"))[:2]
    a, b = load_file(os.path.join(d, first)), load_file(os.path.join(d, second))
    key = sorted(a)[0]
    save_file({**b, key: torch.zeros_like(a[key])}, os.path.join(d, second))
    expect_error(d, must_name=(key, "stored twice", first, second))


@pytest.mark.parametrize("how", ["header-length-too-big", "header-not-json", "garbage-file"])
def test_corrupt_header(how):
    d = copy_folder(base(SPEC), "corrupt-" + how)
    f = os.path.join(d, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    if how == "header-length-too-big":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif how == "header-not-json":
        n = int.from_bytes(data[:8], "little")
        data[8:8 + n] = b"{" + b"#" * (n - 1)
    else:
        data = bytearray(b"this is not a safetensors file at all" * 10)
    open(f, "wb").write(bytes(data))
    expect_error(d)


@pytest.mark.parametrize("header", [
    [1, 2],                                                                  # not an object
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": []}},              # no two offsets
    {"a": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}},           # an unknown dtype
    {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},          # a shape its bytes do not hold
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},         # a negative offset
    {"__metadata__": {"config": 5}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
], ids=["list", "no-offsets", "dtype", "shape", "negative-offset", "metadata-not-string"])
def test_header_json_that_is_no_safetensors_header(header):
    """A header that is JSON the safetensors library refuses: an AhnError naming the file (was a raw
    AttributeError / IndexError / SafetensorError traceback), for weights and --ahn alike."""
    d = scratch("bad-header")
    f = os.path.join(d, "model.safetensors")
    h = json.dumps(header).encode()
    with open(f, "wb") as out:
        out.write(len(h).to_bytes(8, "little") + h + bytes(8))
    expect_error(f, must_name=(f, "not a valid safetensors file"))
    expect_error(base(SPEC), ahn=f, must_name=(f, "not a valid safetensors file"))


class _Trap:
    """Unpickling this object creates a marker file: proves whether a checkpoint was unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
@pytest.mark.parametrize("as_folder", [True, False], ids=["folder", "file"])
def test_pickle_checkpoint_refused_not_unpickled(name, as_folder):
    d = scratch("pickle")
    shutil.copy(os.path.join(base(SPEC), "config.json"), d)
    marker = os.path.join(d, "UNPICKLED")
    sd = {k: v for k, v in load_file(os.path.join(base(SPEC), "model.safetensors")).items()}
    sd["__trap__"] = _Trap(marker)
    torch.save(sd, os.path.join(d, name))
    target = d if as_folder else os.path.join(d, name)
    expect_error(target, must_name=() if as_folder else (name,))
    assert not os.path.exists(marker), "the pickle checkpoint was unpickled"


def test_pickle_ahn_checkpoint_refused():
    d = scratch("pickle-ahn")
    marker = os.path.join(d, "UNPICKLED")
    torch.save({"model.layers.0.ahn.fn.A_log": torch.zeros(4), "x": _Trap(marker)}, os.path.join(d, "ahn.pt"))
    expect_error(base(SPEC), ahn=os.path.join(d, "ahn.pt"), window=W, sinks=S, mode="ahn", must_name=("ahn.pt",))
    assert not os.path.exists(marker), "the pickle checkpoint was unpickled"


# --------------------------------------------------------------------------------------------- keys / shapes
def rewrite(folder, fn, name):
    d = copy_folder(folder, name)
    f = os.path.join(d, "model.safetensors")
    sd = fn(dict(load_file(f)))
    save_file({k: v.contiguous() for k, v in sd.items()}, f, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                                 "model.layers.0.self_attn.k_proj.bias", "lm_head.weight"])
def test_missing_key(key):
    d = rewrite(base(SPEC), lambda sd: {k: v for k, v in sd.items() if k != key}, "missing-key")
    expect_error(d, mode="full", must_name=(key,))


def test_missing_keys_listed():
    gone = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    d = rewrite(base(SPEC), lambda sd: {k: v for k, v in sd.items() if k not in gone}, "missing-keys")
    expect_error(d, mode="full", must_name=tuple(gone))


def test_missing_key_qwen3_norm():
    key = "model.layers.1.self_attn.k_norm.weight"
    d = rewrite(base(SPEC3), lambda sd: {k: v for k, v in sd.items() if k != key}, "missing-knorm")
    expect_error(d, mode="full", must_name=(key,))


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.foo.weight", "model.layers.7.mlp.up_proj.weight",
                                 "model.rotary_emb.inv_freq_typo"])
def test_unexpected_key(key):
    d = rewrite(base(SPEC), lambda sd: {**sd, key: torch.zeros(3)}, "unexpected-key")
    expect_error(d, mode="full", must_name=(key,))


def test_unexpected_router_key_in_merged():
    """use_ahn_router is not supported (docs/semantics.md §9): router weights must not be silently dropped."""
    key = "model.layers.0.ahn_router.alpha"
    d = rewrite(merged(SPEC, W, S), lambda sd: {**sd, key: torch.zeros(4)}, "router-key")
    expect_error(d, window=W, sinks=S, mode="ahn", must_name=(key,))


def shapes_named(msg, key, good, bad):
    for shp in (good, bad):
        pat = r"\D+".join(str(x) for x in shp)
        assert re.search(pat, msg.replace(key, "")), f"message does not give shape {list(shp)}: {msg!r}"


@pytest.mark.parametrize("key,bad", [("model.layers.1.mlp.gate_proj.weight", (95, 64)),
                                     ("model.layers.0.self_attn.q_proj.bias", (63,)),
                                     ("model.embed_tokens.weight", (251, 65))])
def test_shape_mismatch(key, bad):
    good = tuple(load_file(os.path.join(base(SPEC), "model.safetensors"))[key].shape)
    d = rewrite(base(SPEC), lambda sd: {**sd, key: torch.zeros(bad)}, "shape")
    msg = expect_error(d, mode="full", must_name=(key,))
    shapes_named(msg, key, good, bad)


# an integer, bool or 8-bit float tensor (a quantized or damaged checkpoint) was cast to the runtime dtype unseen
@pytest.mark.parametrize("key,dtype", [("model.embed_tokens.weight", torch.int32),
                                       ("model.layers.1.mlp.up_proj.weight", torch.int8),
                                       ("model.norm.weight", torch.bool),
                                       ("model.layers.0.ahn.fn.a_proj.weight", torch.float8_e4m3fn)])
def test_tensor_not_stored_as_floating_point(key, dtype):
    src = merged(SPEC, W, S) if ".ahn." in key else base(SPEC)
    d = rewrite(src, lambda sd: {**sd, key: sd[key].to(dtype)}, "dtype")
    expect_error(d, window=W, sinks=S, must_name=(key, "not as floating point", "unquantized"))


@pytest.mark.parametrize("field,bad", [("o_proj.weight", (4, 16, 15)), ("a_proj.weight", (4, 63)),
                                       ("A_log", (5,))])
def test_ahn_shape_mismatch(field, bad):
    key = f"model.layers.1.ahn.fn.{field}"
    a = ahn_only(SPEC, W, S)
    good = tuple(load_file(os.path.join(a, "model.safetensors"))[key].shape)
    d = rewrite(a, lambda sd: {**sd, key: torch.zeros(bad)}, "ahn-shape")
    msg = expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key,))
    shapes_named(msg, key, good, bad)


@pytest.mark.parametrize("field", ["g_proj.weight", "dt_bias", "o_norm.weight"])
def test_ahn_missing_key(field):
    key = f"model.layers.1.ahn.fn.{field}"
    d = rewrite(ahn_only(SPEC, W, S), lambda sd: {k: v for k, v in sd.items() if k != key}, "ahn-missing")
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key,))


def test_ahn_unexpected_key():
    key = "model.layers.0.ahn.fn.q_proj.weight"
    d = rewrite(ahn_only(SPEC, W, S), lambda sd: {**sd, key: torch.zeros(4, 16, 16)}, "ahn-unexpected")
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key,))


def test_merged_missing_ahn_key():
    key = "model.layers.0.ahn.fn.b_proj.weight"
    d = rewrite(merged(SPEC, W, S), lambda sd: {k: v for k, v in sd.items() if k != key}, "merged-missing")
    expect_error(d, window=W, sinks=S, mode="ahn", must_name=(key,))


# --------------------------------------------------------------------------------------------- config
def test_config_missing():
    """A bare .safetensors file with neither a config.json beside it nor a config in its metadata."""
    d = scratch("noconfig")
    shutil.copy(os.path.join(base(SPEC), "model.safetensors"), d)
    expect_error(os.path.join(d, "model.safetensors"))
    expect_error(d)


def _with_config_field(field, bad, name, spec=SPEC):
    """A copy of the base checkpoint whose config.json sets ``field`` to ``bad`` (and whose safetensors metadata
    holds no config, so that config.json is what the loader reads)."""
    d = copy_folder(base(spec), name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg[field] = bad
    write_json(os.path.join(d, "config.json"), cfg)
    sd = load_file(os.path.join(d, "model.safetensors"))
    save_file(sd, os.path.join(d, "model.safetensors"))
    return d


@pytest.mark.parametrize("field,bad", [
    ("rope_theta", "1e6x"), ("eos_token_id", "x"), ("eos_token_id", [151643, None]),
    ("num_key_value_heads", "two"), ("head_dim", [16]), ("rms_norm_eps", None),
    ("max_position_embeddings", "4k"), ("rope_parameters", "default"), ("rope_scaling", 2.0),
    ("architectures", 5), ("_layer_implementation", 3),
])
def test_config_field_of_the_wrong_type(field, bad):
    """A hand-edited config.json whose optional field has the wrong type: one line naming the field
    (it was int()/float()/.get() on the value: a traceback out of the CLIs)."""
    d = _with_config_field(field, bad, "badfield")
    if field in ("architectures", "_layer_implementation"):
        assert ahn_rt.load(d, mode="full", device="cpu") is not None     # not needed, not refused
    else:
        expect_error(d, mode="full", must_name=(field,))


@pytest.mark.parametrize("field,bad", [
    ("rope_theta", -10000.0), ("rope_theta", float("nan")), ("rope_theta", float("inf")),
    ("rms_norm_eps", -1.0), ("rms_norm_eps", float("nan")), ("rms_norm_eps", float("inf")),
])
def test_config_number_out_of_range(field, bad):
    """A hand-edited config.json whose RoPE base or RMSNorm epsilon is a number but not a usable one: one line
    naming the field (a negative or NaN value loaded, and every logit came out NaN)."""
    d = _with_config_field(field, bad, "badnumber")
    expect_error(d, mode="full", must_name=(field, "fix it in config.json"))


@pytest.mark.parametrize("fields,refused", [
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None), True),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"]), True),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None), False),
    (dict(use_sliding_window=True, sliding_window=8), False),          # layer_types: all full_attention
    (dict(use_sliding_window=False, sliding_window=8, max_window_layers=0, layer_types=None), False),
    (dict(use_sliding_window=True, sliding_window=None, max_window_layers=0), False),
])
def test_sliding_window_layers_of_a_plain_config(fields, refused):
    """A plain Qwen config whose use_sliding_window makes some layers attend through a window (as
    transformers reads it: layer_types, else the layers from max_window_layers on) loaded as full
    attention in every layer: silently another model past the window. Refused, naming the field; a config
    where no layer slides still loads."""
    d = copy_folder(base(SPEC), "sliding-layers")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(fields)
    write_json(os.path.join(d, "config.json"), {k: v for k, v in cfg.items() if v is not None or k == "sliding_window"})
    if refused:
        expect_error(d, mode="full", must_name=("use_sliding_window", "layer 1"))
    else:
        assert ahn_rt.load(d, mode="full", device="cpu").config.mode == "full"


def test_a_plain_base_configs_sliding_window_is_not_the_ahn_window():
    """A plain Qwen config's sliding_window (Qwen2.5's 32768 or 131072, with use_sliding_window false) is
    not W (docs/semantics.md §8); it became W when the separate AHN checkpoint's config named its variant
    but no window (without that config: the default, as documented). Now the default both ways; the AHN
    config's own sliding_window still counts."""
    from ahn_rt.config import DEFAULT_WINDOW
    b = copy_folder(base(SPEC), "plain-window-base")
    cfg = json.load(open(os.path.join(b, "config.json")))
    write_json(os.path.join(b, "config.json"), {**cfg, "use_sliding_window": False, "sliding_window": 4096})
    a = copy_folder(ahn_only(SPEC, W, S), "plain-window-ahn")
    write_json(os.path.join(a, "config.json"), {"_ahn_implementation": "GatedDeltaNet"})
    assert ahn_rt.load(b, ahn=a, device="cpu").config.window == DEFAULT_WINDOW
    os.remove(os.path.join(a, "config.json"))
    assert ahn_rt.load(b, ahn=a, device="cpu").config.window == DEFAULT_WINDOW
    write_json(os.path.join(a, "config.json"), {"_ahn_implementation": "GatedDeltaNet", "sliding_window": 7})
    assert ahn_rt.load(b, ahn=a, device="cpu").config.window == 7


@pytest.mark.parametrize("field,bad,needle", [
    ("rope_theta", 0, "> 0"),                       # became the default 10000
    ("rope_theta", True, "is not a number"),        # became 1.0
    ("num_hidden_layers", 2.5, "is not an integer"),  # became 2
    ("vocab_size", True, "is not an integer"),
])
def test_config_number_silently_replaced_or_cut(field, bad, needle):
    """A config number that said something else than what loaded: rope_theta 0 took the default base, a
    fraction was cut to an integer, true read as 1. Each is one line naming the field now."""
    d = _with_config_field(field, bad, "replaced-number")
    expect_error(d, mode="full", must_name=(field, needle))


@pytest.mark.parametrize("field,bad,needle", [
    ("sliding_window", 0, "must be >= 1"),          # became the default window 32640
    ("sliding_window", 6.5, "is not an integer"),   # became 6
    ("num_attn_sinks", True, "is not an integer"),  # became 1
    ("num_attn_sinks", -1, "must be >= 0"),         # said "sinks must be >= 0", an argument not given
])
def test_ahn_config_window_and_sinks_as_given(field, bad, needle):
    d = save_ahn_only(base(SPEC), scratch("ahn-window-field"), W, S, **{field: bad})
    expect_error(base(SPEC), ahn=d, mode="ahn", must_name=(field, needle))


@pytest.mark.parametrize("field,bad", [
    ("tie_word_embeddings", "false"),   # read as true: the checkpoint's own lm_head was dropped, silently
    ("tie_word_embeddings", "no"), ("tie_word_embeddings", [False]), ("use_sliding_window", "false"),
    ("attention_bias", "false"), ("attention_bias", 2),        # (read for Qwen3 only)
])
def test_config_flag_that_is_not_true_or_false(field, bad):
    """A hand-edited config.json whose flag is the string "false" (or another non-bool) was read as Python reads
    its truth: "false" is true. An untied model then ran with its embedding as the LM head, another model,
    without a word. One line naming the field now; a JSON true / false (or 0 / 1) still loads."""
    spec = SPEC3 if field == "attention_bias" else SPEC
    d = _with_config_field(field, bad, "flag", spec)
    expect_error(d, mode="full", must_name=(field, "is not true or false", "fix it in config.json"))
    for good in (False, 0):
        d = _with_config_field(field, good, "flag", spec)
        c = ahn_rt.load(d, mode="full", device="cpu").config
        assert getattr(c, field, False) is False and c.tie_word_embeddings is False
    # true and 1 read as True (a flag that read 1 as false would pass the lines above)
    from ahn_rt.config import parse_config
    cfg = json.load(open(os.path.join(base(spec), "config.json")))
    if field != "use_sliding_window":   # true makes a model of sliding layers, refused elsewhere
        for yes in (True, 1):
            assert getattr(parse_config({**cfg, field: yes}, "config.json"), field) is True


@pytest.mark.parametrize("field", ["use_q_proj", "use_ahn_router"])
def test_ahn_config_flag_that_is_not_true_or_false(field):
    """use_q_proj "false" was refused as "use_q_proj=true is not supported"."""
    d = save_ahn_only(base(SPEC), scratch("ahn-flag"), W, S, **{field: "false"})
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(field, "is not true or false"))
    d = save_ahn_only(base(SPEC), scratch("ahn-flag"), W, S, **{field: False})
    assert ahn_rt.load(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", device="cpu").config.mode == "ahn"


def test_qwen3_config_without_head_dim_is_read_as_transformers_reads_it():
    """A Qwen3 config.json without head_dim is a model of head_dim 128 to transformers (Qwen3Config's
    default), whatever hidden / heads is; it was read as hidden / heads and refused with a shape error."""
    spec = Spec("qwen3", tied=False, hidden=64, heads=4, kv_heads=2, head_dim=128)
    d = copy_folder(base(spec), "qwen3-no-head-dim")
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["head_dim"]
    write_json(os.path.join(d, "config.json"), cfg)
    assert ahn_rt.load(d, mode="full", device="cpu").config.head_dim == 128


@pytest.mark.parametrize("model_type,archs,named", [
    ("qwen2_moe", ["Qwen2MoeForCausalLM"], "qwen2_moe"),
    ("qwen3_moe", ["Qwen3MoeForCausalLM"], "qwen3_moe"),
    ("qwen2_vl", ["Qwen2VLForConditionalGeneration"], "qwen2_vl"),
    (None, ["Qwen3MoeForCausalLM"], "Qwen3MoeForCausalLM"),
    (None, ["Qwen2ForCausalLM"], None),               # no model_type: the architecture names the family
])
def test_another_qwen_family_is_refused_by_name(model_type, archs, named):
    """A config of another Qwen family (MoE, VL) was read as Qwen2 / Qwen3 because its architecture name
    contains "Qwen2" / "Qwen3", then refused by the key check with a list of tensors; it is named now."""
    d = copy_folder(base(SPEC), "other-family")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("model_type")
    write_json(os.path.join(d, "config.json"), {**cfg, "architectures": archs,
                                                 **({"model_type": model_type} if model_type else {})})
    if named:
        msg = expect_error(d, mode="full", must_name=(named, "is not supported"))
        assert "key" not in msg
    else:
        assert ahn_rt.load(d, mode="full", device="cpu").config.family == "qwen2"


@pytest.mark.parametrize("impl", ["Mamba2", "DeltaNet"])
def test_ahn_config_names_another_variant(impl):
    """GatedDeltaNet tensors under a config naming another (supported) variant: the strict key check
    fails and names both variants (docs/semantics.md §8, §11)."""
    d = save_ahn_only(base(SPEC), scratch("impl"), W, S, _ahn_implementation=impl)
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(impl, "GatedDeltaNet"))


@pytest.mark.parametrize("impl", ["RWKV7", "gdn"])
def test_ahn_unsupported_implementation(impl):
    """A name that is not an official _ahn_implementation (a short CLI name included) is refused."""
    d = save_ahn_only(base(SPEC), scratch("impl"), W, S, _ahn_implementation=impl)
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=(impl,))


def test_ahn_use_q_proj():
    d = save_ahn_only(base(SPEC), scratch("qproj"), W, S, use_q_proj=True)
    expect_error(base(SPEC), ahn=d, window=W, sinks=S, mode="ahn", must_name=("use_q_proj",))


def test_merged_config_names_another_variant():
    d = copy_folder(merged(SPEC, W, S), "merged-impl")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["_ahn_implementation"] = "Mamba2"
    write_json(os.path.join(d, "config.json"), cfg)
    expect_error(d, window=W, sinks=S, mode="ahn", must_name=("Mamba2", "GatedDeltaNet"))


def test_ahn_mode_without_ahn_weights():
    expect_error(base(SPEC), window=W, sinks=S, mode="ahn")


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("dtype", ["fp13", "int8", "bogus"])
def test_bad_dtype_name(dtype):
    expect_error(base(SPEC), dtype=dtype, mode="full", must_name=(dtype,))


@pytest.mark.parametrize("window", [0, -3])
def test_window_below_one(window):
    expect_error(merged(SPEC, W, S), window=window, sinks=S, mode="ahn", must_name=("window",))


def test_sinks_negative():
    expect_error(merged(SPEC, W, S), window=W, sinks=-1, mode="ahn", must_name=("sinks",))


# a window beyond any state loaded, and only the first session failed ("cannot allocate ... 29 TiB"): a config
# written with such a sliding_window (the train CLI's --infer-window) loaded without a word
@pytest.mark.parametrize("kw,named", [
    (dict(window=2 ** 31, sinks=S), ("window 2147483648", "2**31 - 1", "lower the window (--window)")),
    (dict(window=W, sinks=2 ** 31 - W + 1), ("sinks 2147483645", "lower the sinks (--sinks)")),
    (dict(window=10 ** 30, sinks=0), ("window 1000000000000000000000000000000",)),
    ({}, ("the config's sliding_window 2147483648", "or override it with --window"))],
    ids=["window", "sinks", "beyond-int64", "config"])
def test_window_beyond_any_state(kw, named):
    ckpt = merged(SPEC, W, S) if kw else merged(SPEC, 2 ** 31, S)
    expect_error(ckpt, mode="ahn", **kw, must_name=named)
    if not kw:   # full attention uses neither: the model loads
        ahn_rt.load(ckpt, mode="full", dtype="float32")


def test_the_largest_window_loads():
    assert ahn_rt.load(merged(SPEC, W, S), window=2 ** 31 - 1 - S, sinks=S).config.window == 2 ** 31 - 1 - S


# a CPU index other than 0 loaded on the CPU as if it existed (torch has one CPU device: cpu, also cpu:0)
@pytest.mark.parametrize("device", ["cpu:3", "cpu:1", torch.device("cpu", 2)], ids=str)
def test_device_that_does_not_exist(device):
    expect_error(base(SPEC), mode="full", device=device, must_name=(f"'{device}' does not exist", "cpu"))


@pytest.mark.parametrize("count,device,named", [
    (0, "cuda", "CUDA is not available"), (0, "cuda:1", "CUDA is not available"),
    (1, "cuda:1", "this machine has 1 CUDA device (cuda:0)"),
    (2, "cuda:7", "this machine has 2 CUDA devices (cuda:0 to cuda:1)")])
def test_cuda_device_that_this_machine_lacks(monkeypatch, count, device, named):
    """As the machine's GPUs are counted (faked here: refused before any CUDA call)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    expect_error(base(SPEC), mode="full", device=device, must_name=(f"'{device}'", named))


def test_the_one_cpu_device_loads_under_both_names():
    assert ahn_rt.load(base(SPEC), mode="full", dtype="float32", device="cpu:0").device == torch.device("cpu")


@pytest.mark.parametrize("mode", ["banana", "AHN-GDN", ""])
def test_bad_mode(mode):
    msg = expect_error(merged(SPEC, W, S), window=W, sinks=S, mode=mode)
    assert "mode" in msg.lower() or (mode and mode in msg), msg


def test_good_inputs_still_load():
    """Sanity for this file: the unmodified checkpoints load (so the errors above come from the defects)."""
    ahn_rt.load(base(SPEC), mode="full", dtype="float32")
    ahn_rt.load(base(SPEC, shard=True), mode="full", dtype=torch.float32)
    ahn_rt.load(base(SPEC3), mode="full", dtype=torch.float32)
    ahn_rt.load(base(SPEC), ahn=ahn_only(SPEC, W, S), window=W, sinks=S, mode="ahn", dtype=torch.float32)
    ahn_rt.load(merged(SPEC, W, S), window=W, sinks=S, mode="ahn", dtype=torch.float32)


# --------------------------------------------------------------------------------------------- forward inputs
@pytest.mark.parametrize("bad", [[0, 251], [-1], "2-D", "float-tensor", [1.5], [3, "7"]],
                         ids=["id-eq-vocab", "negative", "2-D", "float-tensor", "float-in-list", "str-in-list"])
def test_bad_token_ids(bad):
    """forward rejects bad ids with AhnError and leaves the session untouched (position, state)."""
    from checkpoints import random_ids, run_feeds
    from oracle import rel_err
    assert SPEC.vocab == 251
    bad = {"2-D": torch.zeros(2, 3, dtype=torch.long), "float-tensor": torch.zeros(3)}.get(
        bad if isinstance(bad, str) else None, bad)
    model = ahn_rt.load(merged(SPEC, W, S), window=W, sinks=S, dtype=torch.float32, mode="ahn")
    ids = random_ids(12, SPEC.vocab, seed=30)
    sess = model.new_session()
    first = sess.forward(ids[:7])
    with pytest.raises(ahn_rt.AhnError) as ei:
        sess.forward(bad)
    msg = str(ei.value)
    print("AhnError:", msg)
    assert "\n" not in msg and msg.strip()
    assert sess.position == 7, f"failed forward moved the position to {sess.position}"
    rest = sess.forward(ids[7:])
    ref = run_feeds(model, ids)
    err = rel_err(torch.cat([first, rest]), ref)
    assert err <= RTOL_UNTOUCHED, f"session state changed by the failed forward: rel err {err:.3e}"


@pytest.mark.parametrize("empty", [[], torch.zeros(0, dtype=torch.int64)], ids=["list", "int64-tensor"])
def test_empty_forward(empty):
    """Empty input raises AhnError with a one-line message saying the input is empty; nothing is consumed
    (position 0, device position 0) and the next forward works as on a fresh session."""
    model = ahn_rt.load(merged(SPEC, W, S), window=W, sinks=S, dtype=torch.float32, mode="ahn")
    sess = model.new_session()
    with pytest.raises(ahn_rt.AhnError) as ei:
        sess.forward(empty)
    msg = str(ei.value)
    print("AhnError:", msg)
    assert msg.strip() and "\n" not in msg, f"message is not one line: {msg!r}"
    assert "empty" in msg.lower(), f"message does not say the input is empty: {msg!r}"
    assert sess.position == 0 and int(sess.state.pos) == 0
    out = sess.forward([1, 2])
    assert tuple(out.shape) == (2, SPEC.vocab) and sess.position == 2
    assert torch.equal(out, model.new_session().forward([1, 2]))


@pytest.mark.parametrize("stored,dtype,want", [
    ("int8", None, None), ("auto", None, None), (7, None, None),        # refused only when no dtype is given
    ("int8", "float32", torch.float32), ("auto", "bf16", torch.bfloat16),
    ("float64", None, torch.float32), ("float16", None, torch.float16), ("bfloat16", None, torch.bfloat16),
])
def test_the_configs_torch_dtype_is_the_default_dtype_or_refused(stored, dtype, want):
    """torch_dtype is the default compute dtype. A name of no dtype that runs here ran in bf16 silently; now
    it is one line naming the field when no dtype is given (a given dtype needs no default); float64 runs
    in float32, the most precise dtype here."""
    d = _with_config_field("torch_dtype", stored, "stored-dtype")
    if want is None:
        expect_error(d, mode="full", must_name=("torch_dtype", "--dtype"))
    else:
        assert ahn_rt.load(d, mode="full", device="cpu", dtype=dtype).config.dtype == want


def test_a_json_file_that_is_a_folder_says_so(tmp_path):
    """A config.json that is a folder read "is not valid JSON ([Errno 21] Is a directory ...)"."""
    from ahn_rt.config import load_json
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ahn_rt.AhnError, match=r"^config.json .*config.json is a folder, not a JSON file$"):
        load_json(tmp_path / "config.json", "config.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ahn_rt.AhnError, match="is not valid JSON"):
        load_json(tmp_path / "bad.json", "config.json")
