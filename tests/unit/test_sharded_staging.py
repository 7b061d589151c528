"""PinnedStager, the stall of a sharded (fsdp) checkpoint: a staged state is a host copy that training can no
longer change, every later save copies into the same buffers, DTensors keep their sharding, and DCP writes
and reads back what it staged."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kubetrain_trainer.host_copies import PinnedStager


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def state_of(weight: torch.Tensor, moment: torch.Tensor) -> dict:
    return {"model": {"w": weight}, "optim": {"state": {"w": {"exp_avg": moment, "step": 3}},
                                             "param_groups": [{"lr": 0.1, "params": ["w"]}]}}


def test_a_staged_state_is_a_copy_and_later_saves_reuse_its_buffers():
    weight, moment = torch.randn(4, 3), torch.randn(4, 3)
    stager = PinnedStager(pinned=False)

    first = stager.stage(state_of(weight, moment))
    before = first["model"]["w"].clone()
    weight.add_(1.0)  # training goes on
    assert torch.equal(first["model"]["w"], before)
    assert first["optim"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert first["optim"]["state"]["w"]["step"] == 3

    second = stager.stage(state_of(weight, moment))
    assert torch.equal(second["model"]["w"], weight)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # the same host memory
    assert second["optim"]["state"]["w"]["exp_avg"].data_ptr() == first["optim"]["state"]["w"]["exp_avg"].data_ptr()
    assert stager.staged_bytes() == 2 * 4 * 3 * 4

    grown = stager.stage(state_of(torch.randn(5, 3), moment))  # another shape gets its own buffer
    assert grown["model"]["w"].shape == (5, 3)


def test_dtensors_keep_their_sharding_and_dcp_reads_back_what_was_staged(one_rank, tmp_path):
    weight = distribute_tensor(torch.randn(6, 4), one_rank, [Shard(0)])
    moment = distribute_tensor(torch.randn(6, 4), one_rank, [Shard(0)])
    stager = PinnedStager(pinned=False)

    staged = stager.stage(state_of(weight, moment))
    w = staged["model"]["w"]
    assert isinstance(w, DTensor) and w.placements == weight.placements and w.device_mesh == weight.device_mesh
    assert w.to_local().data_ptr() != weight.to_local().data_ptr()
    expected = weight.full_tensor().clone()

    saved = dcp.async_save(state_of(weight, moment), storage_writer=dcp.FileSystemWriter(tmp_path), async_stager=stager)
    weight.to_local().add_(1.0)  # after staging, training may change the live weights
    saved.result()

    target = state_of(distribute_tensor(torch.zeros(6, 4), one_rank, [Shard(0)]),
                      distribute_tensor(torch.zeros(6, 4), one_rank, [Shard(0)]))
    dcp.load(target, storage_reader=dcp.FileSystemReader(tmp_path))
    assert torch.equal(target["model"]["w"].full_tensor(), expected)
    assert torch.equal(target["optim"]["state"]["w"]["exp_avg"].full_tensor(), moment.full_tensor())
