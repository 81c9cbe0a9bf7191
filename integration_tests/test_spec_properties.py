"""Property-based tests (hypothesis) of the offload-spec parser and the device-map builder.

* Every accepted spec gives a sorted tuple of distinct layers in ``[0, num_layers)``; named
  policies stay inside the protected ends and pick exactly their layers; explicit lists/ranges
  give exactly the layers they name; every rejected spec raises ``OffloadSpecError`` (never another
  exception, never a hang).
* ``residual_offload_device_map`` gives every decoder layer its own key on the right device and
  covers every parameter and buffer of the model by exactly one key at a '.' boundary (no
  ``model.layers.1`` / ``model.layers.10`` confusion), also as transformers itself expands it.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lp_plugin.errors import OffloadSpecError
from lp_plugin.planning.plan import residual_offload_device_map, resolve_layers

SETTINGS = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
POLICIES = ("even", "odd", "all", "none")


def _reference_policy(name, lo, hi):
    span = range(lo, hi + 1)
    return {"even": [i for i in span if i % 2 == 0], "odd": [i for i in span if i % 2 == 1],
            "all": list(span), "none": []}[name]


def _assert_valid(layers, n):
    assert isinstance(layers, tuple)
    assert list(layers) == sorted(set(layers))
    assert all(isinstance(i, int) and 0 <= i < n for i in layers)


# ------------------------------------------------------------------------------------ named policies
@SETTINGS
@given(n=st.integers(1, 80), pf=st.integers(0, 12), pl=st.integers(0, 12), name=st.sampled_from(POLICIES),
       pad=st.sampled_from(["", " ", "  \t"]))
def test_named_policy(n, pf, pl, name, pad):
    spec = f"{pad}{name}{pad}"
    if pf + pl > n:
        with pytest.raises(OffloadSpecError, match=r"protect_first \(\d+\) \+ protect_last \(\d+\) is larger"):
            resolve_layers(spec, n, pf, pl)
        return
    expected = _reference_policy(name, pf, n - 1 - pl)
    if not expected and name != "none":
        with pytest.raises(OffloadSpecError, match="selects no layer"):
            resolve_layers(spec, n, pf, pl)
        return
    layers = resolve_layers(spec, n, pf, pl)
    _assert_valid(layers, n)
    assert list(layers) == expected
    assert all(pf <= i <= n - 1 - pl for i in layers)  # protection respected


# -------------------------------------------------------------------------- explicit lists and ranges
@st.composite
def explicit_specs(draw, num_layers=None):
    """(num_layers, spec string, expected layers or None when the spec must be rejected)."""
    n = num_layers if num_layers is not None else draw(st.integers(1, 48))
    items = draw(st.lists(st.one_of(
        st.tuples(st.just("int"), st.integers(-3, n + 3)),
        st.tuples(st.just("range"), st.integers(0, n + 3), st.integers(0, n + 3), st.one_of(st.none(), st.integers(0, 5))),
    ), min_size=1, max_size=6))
    parts, layers, valid = [], [], True
    for item in items:
        if item[0] == "int":
            i = item[1]
            parts.append(str(i))
            layers.append(i)
            valid &= 0 <= i < n
        else:
            start, end, step = item[1:]
            parts.append(f"{start}-{end}" + ("" if step is None else f":{step}"))
            s = 1 if step is None else step
            if s < 1 or end < start:
                valid = False
                continue
            chunk = list(range(start, end + 1, s))
            valid &= all(i < n for i in chunk)
            layers.extend(chunk)
    valid &= len(layers) == len(set(layers))
    sep = draw(st.sampled_from([",", ", ", " , "]))
    spec = draw(st.sampled_from(["", " "])) + sep.join(parts) + draw(st.sampled_from(["", " "]))
    return n, spec, (sorted(layers) if valid else None)


@SETTINGS
@given(case=explicit_specs(), pf=st.integers(0, 3), pl=st.integers(0, 3))
def test_explicit_spec(case, pf, pl):
    n, spec, expected = case
    assume(pf + pl <= n)  # the counts are validated for every spec; covered by test_named_policy
    if expected is None:
        with pytest.raises(OffloadSpecError):
            resolve_layers(spec, n, pf, pl)
        return
    layers = resolve_layers(spec, n, pf, pl)
    _assert_valid(layers, n)
    assert list(layers) == expected  # explicit layers are taken as given, protection or not


@SETTINGS
@given(n=st.integers(1, 48), items=st.lists(st.integers(-5, 60), max_size=8), as_set=st.booleans())
def test_list_spec(n, items, as_set):
    spec = set(items) if as_set else list(items)
    ok = bool(items) and all(0 <= i < n for i in items) and (as_set or len(set(items)) == len(items))
    if not ok:
        with pytest.raises(OffloadSpecError):
            resolve_layers(spec, n, 0, 0)
        return
    layers = resolve_layers(spec, n, 0, 0)
    _assert_valid(layers, n)
    assert list(layers) == sorted(set(items))


_TOKENS = st.sampled_from(list("0123456789,-: \t\nabcdeinvlo_+.;") + ["\u00b2", "\u0663", "\uff11", "--", "99999999999",
                                                                      "even", "odd", "all", "none"])


_ITEMS = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.sampled_from(["\u00b2", "\u0663", "\uff11", "1-\u00b2", "--2", "+2", "2-", "-", ":", "2:1", "1-3:", "1--3", " "]),
    st.lists(_TOKENS, max_size=4).map("".join),
)


@settings(deadline=None, max_examples=300)
@given(n=st.integers(1, 40), text=st.one_of(st.lists(_TOKENS, max_size=12).map("".join), st.text(max_size=12),
                                            st.lists(_ITEMS, min_size=1, max_size=4).map(",".join)))
@example(n=8, text="\u00b2").via("regression: int('\u00b2') raised ValueError")
@example(n=8, text="--2").via("regression: int('--2') raised ValueError")
@example(n=8, text="0-99999999999").via("regression: expanded a 10**11-element range before the range check")
def test_any_text_is_accepted_validly_or_rejected_cleanly(n, text):
    """Fuzz: any string either resolves to valid layers or raises OffloadSpecError (no ValueError
    from int(), no IndexError, no huge range expanded)."""
    try:
        layers = resolve_layers(text, n, 0, 0)
    except OffloadSpecError:
        return
    _assert_valid(layers, n)


# ---------------------------------------------------------------------------------------- device maps
def _config(arch, n):
    from conftest import tiny_config

    return tiny_config(arch, num_layers=n)


@functools.cache
def _meta_names(arch, n):
    """Every parameter and buffer name of the model (tied weights under both names)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(_config(arch, n))
    names = [k for k, _ in model.named_parameters(remove_duplicate=False)]
    names += [k for k, _ in model.named_buffers(remove_duplicate=False)]
    return tuple(names)


def _owners(name, keys):
    return [k for k in keys if name == k or name.startswith(k + ".")]


@st.composite
def map_cases(draw):
    n = draw(st.integers(1, 24))
    pf = draw(st.integers(0, 3))
    pl = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["named", "explicit", "list"]))
    if kind == "named":
        spec = draw(st.sampled_from(POLICIES))
    elif kind == "explicit":
        spec = draw(explicit_specs(n))[1]
    else:
        spec = draw(st.lists(st.integers(-2, n + 2), max_size=6))
    return n, pf, pl, spec


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(case=map_cases(), arch=st.sampled_from(["qwen2", "llama"]), tier=st.sampled_from(["cpu", "disk"]),
       main=st.sampled_from(["cpu", 0]))
def test_device_map_covers_every_module_exactly_once(case, arch, tier, main):
    from transformers.integrations.accelerate import expand_device_map

    n, pf, pl, spec = case
    config = _config(arch, n)
    try:
        expected_layers = resolve_layers(spec, n, pf, pl)
    except OffloadSpecError:
        with pytest.raises(OffloadSpecError):
            residual_offload_device_map(config, spec, tier=tier, main_device=main, protect_first=pf, protect_last=pl)
        return
    dmap = residual_offload_device_map(config, spec, tier=tier, main_device=main, protect_first=pf, protect_last=pl)
    keys = list(dmap)
    assert len(keys) == len(set(keys))
    # each decoder layer has its own key, on the tier when offloaded, else on the main device
    for i in range(n):
        assert dmap[f"model.layers.{i}"] == (tier if i in expected_layers else main)
    assert "model.layers" not in dmap and "model" not in dmap and "" not in dmap
    # no key lies inside another one (at a '.' boundary)
    for a in keys:
        assert _owners(a, [k for k in keys if k != a]) == [], a
    # every parameter and buffer is covered by exactly one key, at a '.' boundary
    names = _meta_names(arch, n)
    expected_device = {}
    for name in names:
        owners = _owners(name, keys)
        assert len(owners) == 1, (name, owners)
        expected_device[name] = dmap[owners[0]]
    # every key covers something (no dangling key)
    assert all(any(_owners(name, [k]) for name in names) for k in keys)
    # and transformers' own (boundary-free, longest-first) expansion agrees
    assert expand_device_map(dmap, list(names)) == expected_device
    # non-layer keys sit on the main device
    assert all(v == main for k, v in dmap.items() if not k.startswith("model.layers."))


@pytest.mark.parametrize("tier", ["gpu", "ram", None])
def test_device_map_rejects_non_accelerate_tiers(tier):
    with pytest.raises(OffloadSpecError, match="can only place layers on 'cpu' or 'disk'"):
        residual_offload_device_map(_config("qwen2", 8), "even", tier=tier)


def test_layer_keys_do_not_confuse_1_and_10():
    config = _config("qwen2", 12)
    dmap = residual_offload_device_map(config, "1", tier="disk", main_device="cpu", protect_first=0, protect_last=0)
    names = _meta_names("qwen2", 12)
    for name in names:
        if name.startswith("model.layers.10.") or name.startswith("model.layers.11."):
            assert _owners(name, list(dmap)) in (["model.layers.10"], ["model.layers.11"])
    from transformers.integrations.accelerate import expand_device_map

    expanded = expand_device_map(dmap, list(names))
    assert {v for k, v in expanded.items() if k.startswith("model.layers.1.")} == {"disk"}
    assert {v for k, v in expanded.items() if k.startswith("model.layers.10.")} == {"cpu"}


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(case=map_cases(), arch=st.sampled_from(["qwen2", "llama"]))
@example(case=(36, 2, 3, "even"), arch="qwen2").via("Qwen2.5-3B: host key model.layers.2 also skipped resident 21..29")
def test_nf4_load_map_quantizes_exactly_the_resident_layers(case, arch):
    """The map ``from_pretrained`` uses for a 4-bit load: transformers' quantizer leaves every
    host-mapped key unquantized and matches keys as regex prefixes without a boundary, so with it
    every Linear of a resident layer is quantized and none of an offloaded one (which lp_plugin
    quantizes itself), judged by transformers' own ``should_convert_module``; the map still covers
    every tensor exactly once, also as transformers expands it."""
    from transformers.integrations.accelerate import expand_device_map
    from transformers.quantizers.quantizers_utils import should_convert_module

    from lp_plugin.planning.config import OffloadConfig
    from lp_plugin.planning.plan import OffloadPlan

    n, pf, pl, spec = case
    config = _config(arch, n)
    try:
        layers = resolve_layers(spec, n, pf, pl)
    except OffloadSpecError:
        return
    plan = OffloadPlan.for_config(config, OffloadConfig(offload=spec, protect_first=pf, protect_last=pl, main_device=0))
    dmap = plan.split_device_map(plan.device_map("cpu"))
    keys_on_cpu = [k for k, v in dmap.items() if v in ("cpu", "disk")]
    linears = {n_.removesuffix(".weight") for n_ in _meta_names(arch, n) if n_.endswith("proj.weight")}
    assert linears
    for name in linears:
        i = int(name.split(".")[2])
        assert should_convert_module(name, keys_on_cpu) == (i not in layers), name
    names = _meta_names(arch, n)
    keys = list(dmap)
    for name in names:
        assert len(_owners(name, keys)) == 1, name
    expanded = expand_device_map(dmap, list(names))
    assert all((v == "cpu") == (int(k.split(".")[2]) in layers) for k, v in expanded.items() if k.startswith("model.layers."))
