"""How the disk tier reads its files: block-aligned payloads, what the page cache holds copied from it, the rest
with direct I/O (or through the cache when the files could stay there), bytes read counted, and the file's
mapping never touched by transfers (its pages would count as the process's memory). The loading side: a disk
tier with a safetensors checkpoint loads the offloaded layers as Accelerate's "disk", never into host memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import build_tiny

import lp_plugin
from lp_plugin.core import accel
from lp_plugin.core.tiers import DiskTier, allocate_host, sha256_of
from lp_plugin.core.tiers.layerfile import ALIGN
from lp_plugin.errors import OffloadFileError
from lp_plugin.planning.budget import host_budget

KEY = "layer_00003"


def _payload(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _tier(tmp_path, flat, **attrs) -> DiskTier:
    tier = DiskTier(pin=False, offload_folder=str(tmp_path / "off"), model_tag="t")
    for name, value in attrs.items():
        setattr(tier, name, value)
    tier.put(KEY, flat, [], sha256_of(flat))
    return tier


def _entry(tier):
    return tier._files[KEY]


def _needs_direct_io(tier):
    if _entry(tier).direct_fd is None:
        pytest.skip("this file system refuses direct I/O (O_DIRECT)")


# ------------------------------------------------------------------------------------------ the file
def test_layer_file_payload_starts_on_a_block_and_safetensors_reads_it(tmp_path):
    flat = _payload(3 * ALIGN + 17)
    tier = _tier(tmp_path, flat)
    path = tmp_path / "off" / f"{KEY}.safetensors"
    assert (os.path.getsize(path) - flat.numel()) % ALIGN == 0
    assert torch.equal(safetensors.torch.load_file(str(path))["flat"], flat)
    tier.close()


def test_host_buffers_start_on_a_block():
    for n in (1, 4095, 4097, 1 << 20):
        assert allocate_host(n, False, "x").data_ptr() % ALIGN == 0
        assert allocate_host(n, False, "x").numel() == n


# ------------------------------------------------------------------------------------------ reads
@pytest.mark.parametrize("direct_reads", [True, False])
def test_cold_reads_are_direct_only_when_the_tier_bypasses_the_cache(tmp_path, direct_reads):
    """Warm (just written): everything from the page cache. Evicted: direct I/O for whole blocks (the tail
    through the cache) when the tier bypasses it, else all through the cache; the bytes are the same."""
    n = 5 * (16 << 20) + 12345  # several read pieces and a tail
    flat = _payload(n, 1)
    tier = _tier(tmp_path, flat, direct_reads=direct_reads, readers=3)
    if direct_reads:
        _needs_direct_io(tier)
    dst = allocate_host(n, False, "dst")
    tier.read_into(KEY, dst)
    assert torch.equal(dst, flat)
    assert tier.bytes_read() == (n, 0)
    tier.drop_page_cache()
    dst.zero_()
    tier.read_into(KEY, dst)
    assert torch.equal(dst, flat)
    read, direct = tier.bytes_read()
    assert read == 2 * n
    if direct_reads:
        assert direct == n - n % ALIGN
        # and direct reads leave the cache as it was (no readahead behind them): the next read is direct again
        tier.read_into(KEY, dst)
        assert tier.bytes_read() == (3 * n, 2 * direct)
    else:
        assert direct == 0
    tier.close()


def test_what_the_page_cache_holds_is_copied_from_it_and_only_the_rest_read_directly(tmp_path):
    n = 8 * (16 << 20)
    flat = _payload(n, 7)
    tier = _tier(tmp_path, flat, direct_reads=True, readers=2)
    _needs_direct_io(tier)
    tier.drop_page_cache()
    path = tmp_path / "off" / f"{KEY}.safetensors"
    start = os.path.getsize(path) - n
    with open(path, "rb") as f:  # the first half of the payload into the page cache, with readahead turned off
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # (pages it adds would land while the tier reads)
        f.seek(start)
        f.read(n // 2)
        os.posix_fadvise(f.fileno(), start + n // 2, 0, os.POSIX_FADV_DONTNEED)
    dst = allocate_host(n, False, "dst")
    # what the page cache holds just before the read: the first half, less what memory pressure took back since
    cached = _cached_bytes(path, start, n)
    tier.read_into(KEY, dst)
    assert torch.equal(dst, flat)
    read, direct = tier.bytes_read()
    assert n // 4 <= cached <= n // 2  # both kinds of range are there to read
    assert read == n and abs(direct - (n - cached)) <= (4 << 20)  # pages may come or go while it reads
    tier.close()


def _cached_bytes(path, start: int, n: int) -> int:
    """How many bytes of the file's range ``[start, start + n)`` (whole pages) the page cache holds, asked
    with libc's ``mincore`` on a mapping of the file of this test's own."""
    page = mmap.PAGESIZE
    assert start % page == 0 and n % page == 0
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), start + n, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        vec = ctypes.create_string_buffer(n // page)
        rc = mincore(view.ctypes.data + start, n, vec)
        del view  # the mapping closes only once nothing holds a view of it
    assert rc == 0, os.strerror(ctypes.get_errno())
    return int((np.frombuffer(vec.raw, dtype=np.uint8) & 1).sum()) * page


def test_an_unaligned_destination_is_read_through_the_cache(tmp_path):
    n = 3 * ALIGN
    flat = _payload(n, 2)
    tier = _tier(tmp_path, flat, direct_reads=True)
    tier.drop_page_cache()
    base = allocate_host(n + 1, False, "dst")
    dst = base[1:]
    tier.read_into(KEY, dst)
    assert torch.equal(dst, flat)
    assert tier.bytes_read() == (n, 0)
    tier.close()


def test_a_file_written_by_another_writer_is_reused_and_read(tmp_path):
    """A valid layer file whose payload is not block-aligned (safetensors' own writer) is still lp_plugin's
    file: reused as it is, read through the cache."""
    flat = _payload(2 * ALIGN + 5, 3)
    tier = _tier(tmp_path, flat)
    path = tmp_path / "off" / f"{KEY}.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tier.close()
    safetensors.torch.save_file({"flat": flat}, str(path), metadata=meta)
    assert (os.path.getsize(path) - flat.numel()) % ALIGN != 0
    tier = _tier(tmp_path, flat, direct_reads=True)
    assert tier.report[KEY] == "reused"
    assert _entry(tier).direct_fd is None
    dst = allocate_host(flat.numel(), False, "dst")
    tier.read_into(KEY, dst)
    assert torch.equal(dst, flat)
    tier.close()


def test_a_file_truncated_after_attach_is_refused_not_read(tmp_path):
    flat = _payload(4 * ALIGN, 4)
    tier = _tier(tmp_path, flat, direct_reads=True)
    os.truncate(tmp_path / "off" / f"{KEY}.safetensors", 2 * ALIGN)
    with pytest.raises(OffloadFileError):
        tier.read_into(KEY, allocate_host(flat.numel(), False, "dst"))
    tier.close()


def test_the_cache_is_bypassed_when_the_files_exceed_the_host_budget(tmp_path):
    flat = _payload(2 * ALIGN, 5)
    small = _tier(tmp_path / "a", flat, host_budget=ALIGN)
    assert small.bypasses_cache()
    roomy = _tier(tmp_path / "b", flat, host_budget=1 << 40)
    assert not roomy.bypasses_cache()  # (a few KiB are far below half of any machine's available memory)
    small.close()
    roomy.close()


def test_reads_never_touch_the_files_mapping(tmp_path):
    """The host memory the process holds does not grow with what it reads: transfers read the file, and the
    mapping the model's tensors point at between uses is never faulted in (a real process, its RssFile)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        from lp_plugin.core.tiers import DiskTier, allocate_host, sha256_of

        def rss_file():
            for line in open("/proc/self/status"):
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024

        n = 64 << 20
        flat = torch.randint(0, 256, (n,), dtype=torch.uint8)
        dst = allocate_host(n, False, "dst")
        before = rss_file()
        tier = DiskTier(pin=False, offload_folder={str(tmp_path / "off")!r}, model_tag="t")
        tier.put("layer_00001", flat, [], sha256_of(flat))  # (verified: hashed as read, not through the mapping)
        for _ in range(3):
            tier.read_into("layer_00001", dst)
        assert torch.equal(dst, flat)
        print(rss_file() - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert int(out.stdout.split()[-1]) < 8 << 20  # (64 MiB if the reads went through the mapping)


# ------------------------------------------------------------------------------------------ loading
def test_disk_tier_loads_offloaded_layers_from_the_checkpoints_files(tmp_path):
    """from_pretrained with the disk tier maps the offloaded layers to Accelerate's "disk" (their values stay in
    the checkpoint's safetensors files until attach packs each one); outputs and detach as with any load."""
    model = build_tiny("llama", num_layers=6)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    loaded = lp_plugin.from_pretrained(str(ckpt), offload="1,3", tier="disk", offload_folder=str(tmp_path / "off"))
    handle = lp_plugin.get_handle(loaded)
    for layer in handle.layers:
        assert layer.accel_hooks, "Accelerate offloaded the layer"
        loader = layer.accel_hooks[0][2].weights_map.dataset
        assert any("safetensors_file" in info for info in loader.index.values())
        assert not any(k.startswith(f"model.layers.{layer.index}.") for k in loader.state_dict)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    handle.detach()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_a_loader_reading_onto_a_device_gives_host_values(tmp_path):
    """Accelerate's loader reads file-backed values onto its execution device; lp_plugin reads them to the host
    (a layer at a time on a small card would not fit), and leaves the loader as it was."""
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    lin = torch.nn.Linear(4, 3)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()}, str(path))
    index = {k: {"safetensors_file": str(path), "weight_name": k, "dtype": "float32"} for k in ("lin.weight", "lin.bias")}
    loader = OffloadedWeightsLoader(index=index, device="meta")
    hook = AlignDevicesHook(execution_device="cpu", offload=True, weights_map=PrefixedDataset(loader, "lin."))
    values, held = accel.hooked_values(lin, [("", lin, hook)])
    assert values["weight"].device.type == "cpu" and torch.equal(values["weight"], lin.weight.detach())
    assert torch.equal(values["bias"], lin.bias.detach())
    assert held == [] and loader.device == "meta"


# ------------------------------------------------------------------------------------------ budgets
def test_the_host_budget_is_max_memorys_cpu_entry_beside_a_gpu():
    gpu = torch.device("cuda", 0)
    assert host_budget(((0, 5), ("cpu", 9)), gpu) == 9
    assert host_budget((("main", 5),), torch.device("cpu")) is None
    assert host_budget(None, gpu) is None


def _read_in_child(tier, n, queue):
    import hashlib

    dst = allocate_host(n, False, "dst")
    tier.read_into(KEY, dst)
    queue.put(hashlib.sha256(dst.numpy()).hexdigest())  # (no torch op: its OpenMP threads are not fork-safe)


def test_a_forked_child_reads_with_readers_of_its_own(tmp_path):
    """The parent's reader threads do not exist in a forked child: the child's reads make their own pool
    instead of waiting on the parent's forever."""
    import multiprocessing

    n = 3 * (16 << 20)
    flat = _payload(n, 6)
    tier = _tier(tmp_path, flat, readers=2)
    tier.read_into(KEY, allocate_host(n, False, "dst"))  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(tier, n, queue))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == sha256_of(flat)
    tier.close()


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_an_edit_made_in_standby_is_kept_by_detach_and_by_the_next_forward(tmp_path, mode):
    """An edit made in standby lands in the disk tier's mapping, not in its file: transfers read it from there."""
    model = build_tiny("llama", num_layers=6)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    handle = lp_plugin.attach(model, offload="1,3", tier="disk", mode=mode, offload_folder=str(tmp_path / "off"))
    weight = model.get_parameter("model.layers.3.mlp.down_proj.weight")
    expected = weight.detach().clone() * 2
    with torch.no_grad():
        weight.mul_(2)
    handle.detach()
    assert torch.equal(model.get_parameter("model.layers.3.mlp.down_proj.weight"), expected)
    with torch.no_grad():
        ref = model(ids).logits
    handle = lp_plugin.attach(model, offload="1,3", tier="disk", mode=mode, offload_folder=str(tmp_path / "off"))
    with torch.no_grad():
        model.get_parameter("model.layers.1.self_attn.q_proj.weight").mul_(0.5)
        ref_model_weight = model.get_parameter("model.layers.1.self_attn.q_proj.weight").detach().clone()
        out = model(ids).logits
    handle.detach()
    assert torch.equal(model.get_parameter("model.layers.1.self_attn.q_proj.weight"), ref_model_weight)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)
        assert not torch.equal(out, ref)


def test_a_model_whose_weights_are_converted_while_loading_still_loads_with_the_disk_tier(tmp_path):
    """Fused MoE experts are converted by transformers as they load: offloaded to Accelerate's "disk" they would
    need a folder of transformers' own, so such a model loads its offloaded layers into host memory instead."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, vocab_size=128)
    model = MixtralForCausalLM(config).eval()
    model.save_pretrained(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    loaded = lp_plugin.from_pretrained(str(tmp_path / "ckpt"), offload="1,2", tier="disk",
                                       offload_folder=str(tmp_path / "off"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
