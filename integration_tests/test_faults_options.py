"""Bad options to attach() and from_pretrained(): one error of lp_plugin's own type, raised before any
work, naming the option and the value at fault; the model is left as it was (same state dict, same
logits, no handle, no hooks, and it can be attached again)."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from fault_parts import Tiny, assert_unchanged

import lp_plugin
from lp_plugin.errors import OffloadFileError, OffloadSpecError


@pytest.fixture
def tiny():
    return Tiny()


def _a_file(tmp):
    p = tmp / "not_a_folder"
    p.write_text("x")
    return p


def _under_a_file(tmp):
    return _a_file(tmp) / "sub"


# (case id, attach kwargs (callables get tmp_path), exception type, what the message must quote: the option
# or the value at fault, and the alternative it offers where there is one)
BAD_INPUTS = [
    ("unknown-spec", dict(offload="evne"), OffloadSpecError, ["'evne'", "'even'"]),
    ("layer-out-of-range", dict(offload="2,8"), OffloadSpecError, ["[8]", "0..7"]),
    ("negative-layer", dict(offload="-1,2"), OffloadSpecError, ["[-1]"]),
    ("range-past-end", dict(offload="4-20"), OffloadSpecError, ["'4-20'"]),
    ("huge-range-no-hang", dict(offload="0-99999999999"), OffloadSpecError, ["'0-99999999999'"]),
    ("duplicate-layers", dict(offload="2,4,2"), OffloadSpecError, ["[2]", "'2,4,2'"]),
    ("overlapping-ranges", dict(offload="2-4,3"), OffloadSpecError, ["[3]"]),
    ("duplicate-in-list", dict(offload=[3, 3]), OffloadSpecError, ["[3]"]),
    ("empty-string", dict(offload=""), OffloadSpecError, ["offload='none'"]),
    ("blank-string", dict(offload="   "), OffloadSpecError, ["offload='none'"]),
    ("empty-list", dict(offload=[]), OffloadSpecError, ["offload='none'"]),
    ("empty-item", dict(offload="2,,4"), OffloadSpecError, ["'2,,4'"]),
    ("range-step-0", dict(offload="2-6:0"), OffloadSpecError, ["'2-6:0'", "START-END[:STEP]"]),
    ("range-reversed", dict(offload="6-2"), OffloadSpecError, ["'6-2'"]),
    ("unparsable-item", dict(offload="2;4"), OffloadSpecError, ["'2;4'"]),
    ("double-minus", dict(offload="--2"), OffloadSpecError, ["'--2'"]),
    ("non-ascii-digit", dict(offload="\u00b2"), OffloadSpecError, ["'\u00b2'"]),
    ("spec-none", dict(offload=None), OffloadSpecError, ["None", "'even'"]),
    ("spec-float", dict(offload=2.5), OffloadSpecError, ["float"]),
    ("list-of-str", dict(offload=["2"]), OffloadSpecError, ["'2'"]),
    ("list-of-bool", dict(offload=[True]), OffloadSpecError, ["True"]),
    ("protect-sum-too-large", dict(offload="even", protect_first=5, protect_last=4), OffloadSpecError,
     ["protect_first (5)", "protect_last (4)"]),
    ("protect-negative", dict(offload="even", protect_first=-1), OffloadSpecError, ["protect_first", "-1"]),
    ("named-selects-nothing", dict(offload="even", protect_first=4, protect_last=4), OffloadSpecError,
     ["offload='even'", "protect_first=4", "protect_last=4"]),
    ("odd-selects-nothing", dict(offload="odd", protect_first=2, protect_last=5), OffloadSpecError, ["offload='odd'"]),
    ("alpha>1", dict(alpha=1.5), OffloadSpecError, ["alpha", "1.5"]),
    ("alpha<0", dict(alpha=-0.1), OffloadSpecError, ["alpha", "-0.1"]),
    ("alpha-nan", dict(alpha=float("nan")), OffloadSpecError, ["alpha", "nan"]),
    ("alpha-inf", dict(alpha=math.inf), OffloadSpecError, ["alpha", "inf"]),
    ("alpha-string", dict(alpha="abc"), OffloadSpecError, ["alpha", "'abc'"]),
    ("alpha-none", dict(alpha=None), OffloadSpecError, ["alpha", "None"]),
    ("prefetch<0", dict(mode="stream", prefetch=-1), OffloadSpecError, ["prefetch", "-1"]),
    ("prefetch-float", dict(mode="stream", prefetch=1.5), OffloadSpecError, ["prefetch", "1.5"]),
    ("prefetch-string", dict(prefetch="two"), OffloadSpecError, ["prefetch", "'two'"]),
    ("unknown-tier", dict(tier="ram"), OffloadSpecError, ["'ram'", "'cpu'", "'disk'"]),
    ("tier-not-a-str", dict(tier=3), OffloadSpecError, ["tier", "3"]),
    ("unknown-mode", dict(mode="fast"), OffloadSpecError, ["'fast'", "'session'", "'stream'"]),
    ("folder-is-a-file", dict(tier="disk", offload_folder=_a_file), OffloadFileError, ["not_a_folder"]),
    ("folder-under-a-file", dict(tier="disk", offload_folder=_under_a_file), OffloadFileError, ["not_a_folder/sub"]),
]


@pytest.mark.parametrize("kwargs,exc,quoted", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS])
def test_bad_input_is_rejected_and_model_unchanged(tiny, tmp_path, kwargs, exc, quoted):
    kwargs = {k: (v(tmp_path) if callable(v) else v) for k, v in kwargs.items()}
    tracemalloc.start()
    try:
        with pytest.raises(exc) as refused:
            lp_plugin.attach(tiny.model, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [q for q in quoted if q not in str(refused.value)] == []
    assert peak < 16 * 2**20, peak  # rejected up front: no range expanded into a list, nothing packed
    assert_unchanged(tiny.model, tiny.ref, tiny.state, tmp_path)



def test_from_pretrained_refuses_bad_options_before_loading(tiny_checkpoints, tmp_path):
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], device_map="cpu")
    assert "device_map='cpu'" in str(refused.value) and "'auto'" in str(refused.value)
    with pytest.raises(OffloadSpecError) as refused:
        lp_plugin.from_pretrained(tiny_checkpoints["qwen2"], alpha=2)
    assert "alpha" in str(refused.value)
