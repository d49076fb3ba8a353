"""The README's first command: `python -m ahn_rt.generate` with no arguments runs the shipped demo model
(weights/demo) on its demo prompt — a passkey stated beyond the window — in a few seconds on a CPU; full
attention recalls it, every mode prints five digits and the stats line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "weights" / "demo"
# No tolerances: exact text and exit codes. TIMEOUT_S bounds a run (a few seconds on 2 CPU cores).
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="weights/demo not present")


def run(*args):
    p = subprocess.run([sys.executable, "-m", "ahn_rt.generate", *args], capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    return p.returncode, p.stdout, p.stderr


def test_default_runs_the_demo_and_full_attention_recalls_the_passkey():
    answer = json.loads((DEMO / "demo.json").read_text())["answer"]
    rc, out, err = run("--mode", "full")
    assert rc == 0, err
    assert out.strip() == answer
    assert "[demo]" in err and f"expected answer {answer}" in err and "[ahn_rt] prompt 1300 tok" in err


@pytest.mark.parametrize("mode", ["ahn", "swa"])
def test_the_other_modes_answer_with_five_digits(mode):
    rc, out, err = run("--mode", mode)
    assert rc == 0, err
    assert len(out.strip()) == 5 and out.strip().isdigit(), out
    assert f"Mode {mode}" in err


def test_demo_with_an_own_prompt():
    rc, out, err = run("--prompt", "def main(", "--max-new-tokens", "5", "--temperature", "0", "--quiet-stats")
    assert rc == 0 and "[demo]" not in err, err
