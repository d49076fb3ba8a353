"""The Python API used the way an embedding service uses it, mistakes included: every caller mistake is
one AhnError at the call (never a TypeError from inside torch, never a silently ignored argument), a
session is used by one caller at a time, and a state file's errors say what to do with a state file.
On the demo model (CPU, loads in well under a second)."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

import ahn_rt
from ahn_rt import AhnError

DEMO = Path(__file__).resolve().parent.parent / "weights" / "demo"
P = "def f(x):\n    return"


@pytest.fixture(scope="module")
def model():
    return ahn_rt.load(DEMO)


@pytest.fixture(scope="module")
def other():
    return ahn_rt.load(DEMO)


@pytest.mark.parametrize("kw", [dict(temperature="0.5"), dict(temperature=None), dict(top_k=1.5),
                                dict(top_k="3"), dict(top_k=True), dict(top_p="0.5"),
                                dict(repetition_penalty=None), dict(min_p=[0.1])])
def test_sampling_arguments_of_the_wrong_type_are_one_line_at_the_call(model, kw):
    name = next(iter(kw))
    with pytest.raises(AhnError, match=name):
        model.generate(P, max_new_tokens=2, **kw)
