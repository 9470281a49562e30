"""kernels/host_values.py: a device tensor placed with its host copy is read from that copy, by the
helper itself and by everything that reads document boundaries (``pack``, the KDA chunk tables, the
training loop's batch move). The device here is ``meta``: reading a meta tensor's values raises, so
a test that passes read nothing from the device."""

import gc

import pytest
import torch

from kernels import host_values as hv
from kernels.kda.chunk import sequence_tables
from model.packed import pack

META = torch.device("meta")


def test_placed_tensor_is_read_from_its_host_copy_until_changed_in_place():
    host = torch.tensor([0, 3, 8], dtype=torch.int32)
    placed = hv.to_device(host, META, keep_host_copy=True)
    assert placed.device == META and torch.equal(hv.host_values(placed), host)
    host[1] = 5  # the caller's tensor may change afterwards: the record is a copy
    assert hv.host_values(placed).tolist() == [0, 3, 8]
    placed.add_(1)  # changed on the device: the copy is stale, so the device would be read
    with pytest.raises(NotImplementedError):
        hv.host_values(placed)


def test_without_a_host_copy_the_device_is_read():
    placed = hv.to_device(torch.arange(4), META)
    with pytest.raises(NotImplementedError):
        hv.host_values(placed)
    cpu = torch.arange(4)
    assert hv.host_values(cpu) is cpu and hv.to_device(cpu, "cpu", keep_host_copy=True) is cpu
    with pytest.raises(ValueError, match="CPU tensor"):
        hv.to_device(placed, "cpu")


def test_record_goes_with_its_device_tensor():
    before = len(hv._KNOWN)
    placed = hv.to_device(torch.arange(3), META, keep_host_copy=True)
    assert len(hv._KNOWN) == before + 1
    del placed
    gc.collect()
    assert len(hv._KNOWN) == before


def test_pack_and_kda_tables_read_no_device_values():
    cu = hv.to_device(torch.tensor([0, 3, 100, 128, 130, 256], dtype=torch.int32), META, keep_host_copy=True)
    packed = pack(2, 128, cu, META)
    assert packed.cu_seqlens is cu and packed.max_document_length == 126 and not packed.single_document_rows
    cu_dev, info, offsets, n_chunks = sequence_tables(cu, 1, 256, META)
    assert n_chunks == 1 + 2 + 1 + 1 + 2 and cu_dev.device == info.device == META
    # a CPU cu_seqlens (or none) is placed by pack with its copy, so the KDA layers read none either
    placed = pack(2, 128, torch.tensor([0, 128, 200, 256]), META).cu_seqlens
    assert placed.device == META and hv.host_values(placed).tolist() == [0, 128, 200, 256]
    assert hv.host_values(pack(2, 128, None, META).cu_seqlens).tolist() == [0, 128, 256]


def test_training_loop_moves_batches_keeping_the_boundaries_on_the_host():
    from train.loop import _to_device

    batch = {"tokens": torch.zeros(1, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 5, 8], dtype=torch.int32),
             "global_cu_seqlens": torch.tensor([0, 5, 16], dtype=torch.int32), "note": "kept"}
    moved = _to_device(batch, META)
    assert moved["tokens"].device == moved["cu_seqlens"].device == META and moved["note"] == "kept"
    assert hv.host_values(moved["cu_seqlens"]).tolist() == [0, 5, 8]
    assert hv.host_values(moved["global_cu_seqlens"]).tolist() == [0, 5, 16]
    with pytest.raises(NotImplementedError):  # any other tensor is a plain copy
        hv.host_values(moved["tokens"])
