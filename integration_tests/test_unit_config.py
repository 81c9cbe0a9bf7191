"""``OffloadConfig`` and its parsers (lp_plugin/planning/config.py) on their own: no model, no torch work."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from lp_plugin import OffloadConfig, OffloadSpecError
from lp_plugin.planning.config import parse_max_memory, parse_size


def test_defaults_are_valid_and_every_field_is_an_option():
    config = OffloadConfig()
    assert (config.offload, config.tier, config.mode, config.alpha, config.prefetch) == ("even", "cpu", "session", 1.0, 1)
    assert OffloadConfig.names() == tuple(f.name for f in dataclasses.fields(OffloadConfig))


@pytest.mark.parametrize(
    "text,expected",
    [
        (1024, 1024),
        ("4096", 4096),
        ("6GiB", 6 * 2**30),
        ("6144MiB", 6144 * 2**20),
        ("1.5KiB", 1536),
        ("6.5GB", 6_500_000_000),
        ("1TiB", 2**40),
        ("2TB", 2 * 10**12),
        ("2mB", 2_000_000),  # case-insensitive units, powers of 10
        ("8Gb", 10**9),  # a unit ending in a lower-case b counts bits, as Accelerate reads it
    ],
)
def test_sizes(text, expected):
    if text == "8Gb":
        with pytest.warns(UserWarning, match="gigabits") as record:
            assert parse_size(text) == expected
        assert record[0].filename == __file__  # the caller's line, not lp_plugin's
        with pytest.warns(UserWarning) as record:
            OffloadConfig(offload="auto", max_memory=text)
        assert record[0].filename == __file__  # however deep the parse
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "six", "-1GiB", "nanGiB", "infMB", -5, True, 1.5, "6 parsecs"])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(OffloadSpecError):
        parse_size(text)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("6GiB", (("main", 6 * 2**30),)),
        ({0: "6GiB", "cpu": "30GiB"}, ((0, 6 * 2**30), ("cpu", 30 * 2**30))),
        ("0:6GiB;cpu:30GiB", ((0, 6 * 2**30), ("cpu", 30 * 2**30))),
        ("cuda:1=1MiB,cpu=2MiB", ((1, 2**20), ("cpu", 2 * 2**20))),
        ({"cuda:0": 5}, ((0, 5),)),
    ],
)
def test_max_memory_forms(value, expected):
    assert parse_max_memory(value) == expected
    assert parse_max_memory(parse_max_memory(value)) == expected  # a parsed value reads the same


@pytest.mark.parametrize(
    "value",
    [{}, {"disk": "1GiB"}, {"gpu0": "1GiB"}, {0: "1GiB", "cuda:0": "2GiB"}, "0:1GiB;0:2GiB", "6GiB;cpu", "6GiB;7GiB", "cpu", "disk"],
)
def test_bad_max_memory_is_refused(value):
    with pytest.raises(OffloadSpecError):
        parse_max_memory(value)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "fast"},
        {"alpha": 1.5},
        {"alpha": "1"},
        {"prefetch": -1},
        {"prefetch": True},
        {"protect_first": 1.0},
        {"offload": None},
        {"offload": ""},
        {"offload": []},
        {"offload": [1, "2"]},
        {"offload": 3.0},
        {"tier": "tape"},
        {"max_memory": "lots"},
        {"work": "train"},
    ],
)
def test_bad_options_are_refused_when_built(options):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(**options)


@pytest.mark.parametrize("name", ["max_context", "batch_size", "work"])
def test_budget_options_need_offload_auto(name):
    value = {"max_context": 512, "batch_size": 2, "work": "generate"}[name]
    with pytest.raises(OffloadSpecError):
        OffloadConfig(offload="even", **{name: value})
    assert getattr(OffloadConfig(offload="auto", **{name: value}), name) == value


@pytest.mark.parametrize("options", [{"alpha": 0.0}, {"skip": "3"}])
def test_auto_refuses_what_it_cannot_plan(options):
    with pytest.raises(OffloadSpecError):
        OffloadConfig(offload="auto", **options)


def test_from_options_applies_options_and_refuses_unknown_ones():
    base = OffloadConfig(offload="odd", mode="stream")
    assert OffloadConfig.from_options(base) is base
    assert OffloadConfig.from_options(base, prefetch=3) == dataclasses.replace(base, prefetch=3)
    with pytest.raises(OffloadSpecError):
        OffloadConfig.from_options(base, prefech=3)
    with pytest.raises(OffloadSpecError):
        OffloadConfig.from_options({"offload": "odd"})


def test_split_separates_lp_plugin_options_from_the_rest():
    ours, rest = OffloadConfig.split({"offload": "odd", "dtype": "bfloat16", "alpha": 0.5})
    assert ours == {"offload": "odd", "alpha": 0.5}
    assert rest == {"dtype": "bfloat16"}


def test_strings_from_lm_eval_model_args():
    config = OffloadConfig.from_strings({"offload": "2;4;6", "prefetch": "2", "stand_in": None, "mode": "stream"})
    assert (config.offload, config.prefetch, config.stand_in, config.mode) == ("2,4,6", 2, "none", "stream")
    with pytest.raises(OffloadSpecError):
        OffloadConfig.from_strings({"prefetch": "two"})
