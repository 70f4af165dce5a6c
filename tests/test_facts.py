"""Drift between fastvit/facts.py and the copies C++ needs (csrc/ cannot import Python).

csrc/fastvit_cuda.h states the activation codes (``enum Act``) and the attention head-dim limit
(``kMaxHeadDim``) again; these tests parse the header and fail when either side changes alone.
"""

import os
import re

from fastvit import cuda
from fastvit.facts import ACT_CODES, ACTIVATIONS

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "fastvit_cuda.h")


def _header() -> str:
    with open(HEADER) as fh:
        return fh.read()


def _enum(name: str) -> dict:
    """``enum <name> : int { kA = 0, kB = 1 }`` -> {'kA': 0, 'kB': 1}."""
    m = re.search(rf"enum\s+{name}\s*(?::\s*\w+\s*)?\{{([^}}]*)\}}", _header())
    assert m, f"enum {name} not found in {HEADER}"
    items = [i.strip() for i in m.group(1).split(",") if i.strip()]
    return {k.strip(): int(v) for k, v in (i.split("=") for i in items)}


def _act_name(enumerator: str):
    """kActNone -> None, kActGelu -> 'gelu', kActGeluTanh -> 'gelu_tanh'."""
    words = re.findall(r"[A-Z][a-z0-9]*", enumerator[len("kAct"):])
    return None if words == ["None"] else "_".join(w.lower() for w in words)


def test_activation_codes_match_the_cuda_enum():
    codes = {_act_name(k): v for k, v in _enum("Act").items()}
    assert codes == ACT_CODES
    assert tuple(sorted(codes, key=codes.get)) == ACTIVATIONS


def test_cuda_max_head_dim_matches_kMaxHeadDim():
    m = re.search(r"constexpr\s+int\s+kMaxHeadDim\s*=\s*(\d+)\s*;", _header())
    assert m, f"kMaxHeadDim not found in {HEADER}"
    assert int(m.group(1)) == cuda.LIMITS.max_head_dim
