"""Runtime options: positions past max_position_embeddings (full attention warns once, docs/semantics.md §9;
ahn/swa keep going silently, as the official model does) and window/sinks that are not integers."""
import re
import warnings
from pathlib import Path

import pytest
import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt import settings
from ahn_rt.runtime import from_state_dict

ROOT = Path(__file__).resolve().parent.parent
# every switch: settings.py's own (its docstring table is the authority) and the C++-only AHN_RT_GEMV_PDL
SWITCHES = set(settings._CHOICES) | set(settings._KERNEL_FLAGS) | {"AHN_RT_GEMV_PDL"}

# tolerance table: none. Every check here is exact (warning counts, positions, error types).


def test_full_mode_warns_once_past_max_positions_and_ahn_does_not():
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=300, max_position_embeddings=40)
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32)
    ids = list(range(1, 31))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sess = from_state_dict(cfg, sd, mode="full", dtype="float32").new_session()
        sess.forward(ids)                       # 30 <= 40: quiet
        assert not rec
        sess.forward(ids)                       # 60 > 40: one warning
        sess.forward([5])
        sess.forward(ids)
    assert len([w for w in rec if "max_position_embeddings" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # ahn mode: positions grow freely, no warning
        s2 = from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32").new_session()
        s2.forward(ids + ids + ids)
        assert s2.position == 90


def test_window_and_sinks_must_be_integers():
    import pytest

    from ahn_rt import AhnError
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=300)
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32)
    for bad in (dict(window="abc"), dict(window=8.5), dict(sinks=True), dict(sinks="2")):
        with pytest.raises(AhnError, match="must be an integer"):
            from_state_dict(cfg, sd, mode="ahn", dtype="float32", **bad)


def test_a_window_that_does_not_fit_is_an_ahn_error():
    import pytest

    from ahn_rt import AhnError
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=300)
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32)
    with pytest.raises(AhnError, match=r"cannot allocate the state on cpu: .* needed .*lower the window \(--window, load\(window=\)\)"):
        from_state_dict(cfg, sd, mode="ahn", window=2 ** 31 - 3, sinks=2, dtype="float32").new_session()
    # beyond 2**31 - 1 cache slots the window itself is refused, at load
    with pytest.raises(AhnError, match=r"sinks 2 \+ window 100000000000 = 100000000002 cache slots, more than a state "
                                       r"can hold .*lower the window \(--window\)"):
        from_state_dict(cfg, sd, mode="ahn", window=10 ** 11, sinks=2, dtype="float32")


def test_a_bad_model_switch_is_refused_at_load_on_the_cpu_too(monkeypatch):
    """AHN_RT_DECODE_FORK is read at each CUDA graph capture and AHN_RT_PREFILL_CUDNN at each CUDA prefill:
    a value they do not take is one line (SettingsError, naming the variable) when the model is built, on
    every device, not at the first capture or never (the CPU reads neither)."""
    import pytest

    from ahn_rt.settings import SettingsError
    cfg = preset_config("tiny", True, torch.float32)
    cfg.update(vocab_size=300)
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32)
    for name in ("AHN_RT_DECODE_FORK", "AHN_RT_PREFILL_CUDNN"):
        monkeypatch.setenv(name, "yes")
        with pytest.raises(SettingsError, match=rf"^{name}='yes' is not one of 1, 0$"):
            from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32")
        for good in ("1", "0", " 0 "):
            monkeypatch.setenv(name, good)
            from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32")
        monkeypatch.delenv(name)
    # the kernel switches: the C++ side reads any value but 0 as on, so "off" would turn one on
    for name in settings.KERNEL_SWITCHES:
        for bad in ("off", "false", "2", " 0"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(SettingsError, match=rf"^{name}='{bad}' is not one of unset, 0, 1$"):
                from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32")
        monkeypatch.setenv(name, "0")
        from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32")
        monkeypatch.delenv(name)
    from_state_dict(cfg, sd, mode="ahn", window=8, sinks=2, dtype="float32")


def test_kernel_flags_read_as_the_cpp_env_flag_does(monkeypatch):
    """kernel_flag: unset or empty gives the flag's default (on for _KERNEL_FLAGS_ON: AHN_RT_DECODE_PDL),
    0 is off, 1 on, anything else a SettingsError (the C++ side would read "off" as on); a name that is not
    an on/off flag is a KeyError."""
    assert set(settings._KERNEL_FLAGS_ON) <= set(settings._KERNEL_FLAGS)
    for name in settings._KERNEL_FLAGS:
        default = name in settings._KERNEL_FLAGS_ON
        monkeypatch.delenv(name, raising=False)
        assert settings.kernel_flag(name) is default
        monkeypatch.setenv(name, "")
        assert settings.kernel_flag(name) is default
        monkeypatch.setenv(name, "0")
        assert settings.kernel_flag(name) is False
        monkeypatch.setenv(name, "1")
        assert settings.kernel_flag(name) is True
        monkeypatch.setenv(name, "off")
        with pytest.raises(settings.SettingsError):
            settings.kernel_flag(name)
    assert settings._KERNEL_FLAGS_ON == ("AHN_RT_DECODE_PDL",)   # the one measured faster on than off
    with pytest.raises(KeyError):
        settings.kernel_flag("AHN_RT_GEMV_PDL")   # three settings, read by csrc/host/gemv.cpp alone


def test_readme_lists_every_switch_that_settings_knows():
    """README's "Environment switches": the count it states and its table name exactly the switches of
    ahn_rt/settings.py (its docstring table is the authority: the ``_CHOICES`` keys, ``_KERNEL_FLAGS`` and
    AHN_RT_GEMV_PDL), and so do the C++ reads in csrc/; a switch added without a row (or a stale count) fails
    here."""
    root, known = ROOT, SWITCHES
    assert len(known) == len(settings._CHOICES) + len(settings._KERNEL_FLAGS) + 1   # no name twice

    # settings.py's own docstring table: a row whose first cell names the switch (a long name may take the
    # whole first cell and spill into the next: AHN_RT_TRAIN_ATTENTION)
    doc_rows = re.findall(r"^\| (AHN_RT_[A-Z_]+)", settings.__doc__, flags=re.M)
    assert sorted(doc_rows) == sorted(known)

    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Environment switches\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(AHN_RT_[A-Z_]+)`", section, flags=re.M)
    assert sorted(rows) == sorted(known), sorted(set(rows) ^ known)
    words = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
                                        .split())}
    text = " ".join(section.split())    # the count may wrap onto the next line
    stated = re.search(r"whose docstring lists all (\w+)\.", text)
    assert stated and words.get(stated[1]) == len(known), stated and stated[0]
    kernel = re.search(r"The (\w+) kernel A/B switches are read by the C\+\+ side: `AHN_RT_GEMV_PDL` in "
                       r"`csrc/host/gemv.cpp`, the other (\w+) through", text)
    assert kernel and (words.get(kernel[1]), words.get(kernel[2])) == (len(settings._KERNEL_FLAGS) + 1,
                                                                       len(settings._KERNEL_FLAGS)), kernel
    # what the C++ side reads: env_flag's names are _KERNEL_FLAGS, getenv's AHN_RT_GEMV_PDL alone
    csrc = "\n".join(p.read_text(encoding="utf-8") for p in sorted((root / "csrc").rglob("*"))
                     if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    reads = re.findall(r'env_flag\("(AHN_RT_[A-Z_]+)"(, true)?\)', csrc)
    assert {name for name, _ in reads} == set(settings._KERNEL_FLAGS)
    assert {name for name, on in reads if on} == set(settings._KERNEL_FLAGS_ON)   # the defaults agree too
    assert set(re.findall(r'getenv\("(AHN_RT_[A-Z_]+)"\)', csrc)) == {"AHN_RT_GEMV_PDL"}


def test_docs_name_only_switches_that_exist_and_python_reads_them_in_settings_alone():
    """Every AHN_RT_* name in the current-state docs (README.md, docs/, weights/README.md, scripts/demo/README.md;
    not bench/README.md, whose dated results name switches of past experiments) is a switch of ahn_rt/settings.py
    or the build's AHN_RT_WITH_CUDA macro; and no Python module of ahn_rt/ but settings.py reads one from the
    environment (README: "Python reads them in one place")."""
    root, known = ROOT, SWITCHES | {"AHN_RT_WITH_CUDA"}
    docs = [root / "README.md", root / "weights" / "README.md", root / "scripts" / "demo" / "README.md",
            *sorted((root / "docs").glob("*.md"))]
    for doc in docs:
        named = set(re.findall(r"AHN_RT_[A-Z0-9_]*[A-Z0-9]", doc.read_text(encoding="utf-8")))
        assert named <= known, (doc.name, sorted(named - known))
    for py in sorted((root / "ahn_rt").rglob("*.py")):
        if py.name == "settings.py" and py.parent.name == "ahn_rt":
            continue
        text = py.read_text(encoding="utf-8")
        reads = re.findall(r"(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*[\"'](AHN_RT_[A-Z0-9_]+)", text)
        assert not reads, (py.relative_to(root).as_posix(), reads)
