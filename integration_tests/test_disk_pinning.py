"""The disk tier's cached files lent to CUDA (``DiskTier.pins``): where they fit in host memory and there is a GPU,
transfers copy straight from the page cache's pages, exactly what the files hold; an edit or a cold-cache
benchmark takes a unit's pages back and the ring reads it through staging from then on; a file changed after
attach is refused before a copy; a registration CUDA refuses leaves no error behind. The refusals of the decision
run everywhere; the copies on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

import lp_plugin
from lp_plugin.core.tiers import DiskTier, sha256_of
from lp_plugin.errors import OffloadFileError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64, 1, 33]


def test_a_tier_without_a_gpu_never_pins(tmp_path):
    flat = torch.arange(3 * 4096, dtype=torch.int64).to(torch.uint8)
    tier = DiskTier(pin=False, offload_folder=str(tmp_path / "off"), model_tag="t")
    tier.pin_cached = True
    tier.put("layer_00001", flat, [], sha256_of(flat))
    try:
        assert not tier.pins() and not tier.direct("layer_00001") and tier.pinned_cache_bytes() == 0
        with pytest.raises(OffloadFileError):
            tier.transfer_view("layer_00001")
    finally:
        tier.close()


@pytest.mark.parametrize("direct_reads", [None, False])
def test_files_beyond_the_host_budget_are_never_pinned(tmp_path, direct_reads):
    """Even where reads are forced through the page cache: lending would lock more than the budget allows.
    (``pin=True`` as with a GPU; the decision refuses before CUDA is asked anything.)"""
    flat = torch.arange(3 * 4096, dtype=torch.int64).to(torch.uint8)
    tier = DiskTier(pin=True, offload_folder=str(tmp_path / "off"), model_tag="t")
    tier.host_budget, tier.direct_reads = flat.numel() - 1, direct_reads
    tier.put("layer_00001", flat, [], sha256_of(flat))
    try:
        assert not tier.files_fit() and not tier.pins() and not tier.direct("layer_00001")
        assert tier.bypasses_cache() is (direct_reads is None)
    finally:
        tier.close()


# ---------------------------------------------------------------------------------- on a GPU
def _plain_logits(path, device, ids, edit=None):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, device_map={"": device.index}, dtype=torch.bfloat16).eval()
    if edit is not None:
        edit(plain)
    with torch.no_grad():
        out = plain(ids).logits
    del plain
    return out


def _offloaded(path, device, folder, **kw):
    options = dict(offload="all", protect_first=0, protect_last=0, tier="disk", mode="stream", prefetch=1)
    options.update(kw)
    model = lp_plugin.from_pretrained(path, main_device=device, offload_folder=str(folder), dtype=torch.bfloat16,
                                      **options)
    return model, lp_plugin.get_handle(model)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _setup(tiny_checkpoints, folder, edit=None, **kw):
    """The plain tiny Llama's logits (edited by ``edit`` first, when given) and the model offloaded to the disk tier:
    ``(model, handle, ids, want)``."""
    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_checkpoints["llama"]
    ids = torch.tensor([PROMPT], device=device)
    want = _plain_logits(path, device, ids, edit)
    model, handle = _offloaded(path, device, folder, **kw)
    return model, handle, ids, want


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["stream", "session"])
def test_cached_files_are_lent_to_cuda_and_copied_exactly(tiny_checkpoints, tmp_path, mode):
    model, handle, ids, want = _setup(tiny_checkpoints, tmp_path, mode=mode)
    tier = handle.tier
    read_before = tier.bytes_read()
    for _ in range(2):
        assert torch.equal(_logits(model, ids), want)
    assert tier.pins() and all(tier.direct(u.key) for u in handle.units)
    assert tier.pinned_cache_bytes() == sum(u.nbytes for u in handle.units)
    assert tier.bytes_read() == read_before  # no file read: the GPU copied the cached pages
    if mode == "stream":
        assert not handle.movers[0].needs_staging and handle.movers[0].staging is None
    handle.detach()
    assert torch.equal(_logits(model, ids), want)  # detach copied from the lent pages too
    assert tier.pinned_cache_bytes() == 0


@pytest.mark.gpu
@cuda
def test_a_model_deleted_without_detach_gives_every_lent_page_back(tiny_checkpoints, tmp_path):
    """Deleted as users delete a model (no ``detach``), its lent pages stay mapped until the next safe point gives them
    back (the collection itself calls no CUDA): an address range CUDA still counted as registered, mapped again by
    the process, made the next copy or pinned allocation there fail ("resource already mapped")."""
    import gc

    from lp_plugin.core import pinning

    model, handle, ids, want = _setup(tiny_checkpoints, tmp_path)
    assert torch.equal(_logits(model, ids), want)
    views = [e.pinned for e in handle.tier._files.values() if e.pinned is not None and e.pinned.numel()]
    assert views and handle.tier.pins()
    del model, handle
    gc.collect()
    assert pinning.give_back_collected() >= len(views)  # (with whatever earlier tests dropped, if collected now)
    for view in views:  # still mapped (the view holds it) and no longer lent: CUDA takes it again
        assert pinning.register(view.data_ptr(), view.numel())
        pinning.unregister(view.data_ptr())
    host = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    assert float(host.fill_(1).to("cuda").sum()) == 1 << 20


@pytest.mark.gpu
@cuda
def test_pin_cached_false_reads_the_files_and_stays_exact(tiny_checkpoints, tmp_path):
    model, handle, ids, want = _setup(tiny_checkpoints, tmp_path)
    handle.tier.pin_cached = False  # before the first transfer decides
    assert torch.equal(_logits(model, ids), want)
    assert not handle.tier.pins() and handle.movers[0].needs_staging
    assert handle.tier.bytes_read()[0] > 0
    handle.detach()


@pytest.mark.gpu
@cuda
def test_an_edit_in_standby_takes_the_units_pages_back_and_is_carried(tiny_checkpoints, tmp_path):

    def edit(m):
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight.mul_(2)

    model, handle, ids, want = _setup(tiny_checkpoints, tmp_path, edit)
    assert not torch.equal(_logits(model, ids), want)  # (the edit changes the logits)
    edit(model)  # in standby: into the tier's copy-on-write mapping
    assert torch.equal(_logits(model, ids), want)
    edited = [u for u in handle.units if u.index == 1]
    assert edited and not handle.tier.direct(edited[0].key)
    assert all(handle.tier.direct(u.key) for u in handle.units if u.index != 1)
    assert torch.equal(_logits(model, ids), want)
    handle.detach()
    assert torch.equal(_logits(model, ids), want)


@pytest.mark.gpu
@cuda
def test_dropping_the_page_cache_inside_a_session_switches_the_ring_to_reads(tiny_checkpoints, tmp_path):
    model, handle, ids, want = _setup(tiny_checkpoints, tmp_path)
    with lp_plugin.session(model):
        assert torch.equal(_logits(model, ids), want)
        assert handle.tier.pinned_cache_bytes() > 0 and not handle.movers[0].needs_staging
        handle.tier.drop_page_cache()
        assert handle.tier.pinned_cache_bytes() == 0
        for _ in range(2):
            assert torch.equal(_logits(model, ids), want)
        assert handle.movers[0].needs_staging
    assert handle.tier.bytes_read()[0] > 0 and not handle.tier.pins()
    assert torch.equal(_logits(model, ids), want)
    handle.detach()


@pytest.mark.gpu
@cuda
def test_a_file_changed_inside_a_session_is_refused_before_a_copy_from_its_pages(tiny_checkpoints, tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    model, handle = _offloaded(tiny_checkpoints["llama"], device, tmp_path)
    ids = torch.tensor([PROMPT], device=device)
    entry = handle.tier._files[handle.units[2].key]  # (not among the units the last forward loads ahead)

    def flip():
        with open(entry.path, "r+b") as f:  # same size, other bytes, in the payload
            f.seek(entry.start + 64)
            byte = f.read(1)
            f.seek(entry.start + 64)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(entry.path, ns=(0, 0))  # (a stamp that differs whatever the clock's granularity)

    try:
        with lp_plugin.session(model):  # the ring stays open: only the check before each copy can see it
            _logits(model, ids)
            assert handle.tier.direct(entry_key := handle.units[2].key) and handle.tier.pins()
            flip()
            with pytest.raises(OffloadFileError):
                _logits(model, ids)
            flip()  # the verified bytes again (a new stamp): used after one hash
            assert handle.tier.direct(entry_key)
    finally:
        handle.detach()


@pytest.mark.gpu
@cuda
def test_a_registration_cuda_refuses_leaves_no_error_for_the_next_kernel():
    from lp_plugin.core import pinning

    host = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)  # pinned already: registering it is refused
    assert not pinning.register(host.data_ptr(), host.numel())
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    assert float((x * 2).sum()) == 2 * sum(range(1024))  # a kernel launch checks the last CUDA error
    torch.cuda.synchronize()
