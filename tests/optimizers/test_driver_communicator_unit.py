"""Which communicator an optimizer gets for its ``distributed`` argument and model (``driver._communicator``).

Oracle: the documented table (``CurvatureOptimizer``'s docstring) -- a Communicator is used as given; None
follows the model (a DistributedDataParallel model's process group, else one process); True asks for
torch.distributed (the model's group when it is DDP, else the default group); False is one process and an
error with a DDP model; anything else is a TypeError. The torch.distributed cases run on a one-process gloo
group in the test process, so a mutation tool sees them (the spawned runs of test_data_parallel.py do not).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from optimizers import KFAC
from optimizers.communicator import LocalCommunicator, TorchCommunicator
from optimizers.driver import _communicator
from tests.optimizers.test_communicator_threads import gloo_group  # noqa: F401  (fixture)

DDP_FALSE = ("distributed=False with a DistributedDataParallel model would let the ranks' curvature drift apart; "
             "pass the unwrapped module to train on one process")


def test_a_communicator_is_used_as_given():
    comm = LocalCommunicator()
    assert _communicator(comm, None) is comm
    assert _communicator(comm, SimpleNamespace(process_group="ignored")) is comm


@pytest.mark.parametrize("distributed", [None, False])
def test_one_process_without_a_ddp_model(distributed):
    assert type(_communicator(distributed, None)) is LocalCommunicator


def test_false_with_a_ddp_model_is_an_error():
    with pytest.raises(ValueError, match="^" + re.escape(DDP_FALSE) + "$"):
        _communicator(False, SimpleNamespace(process_group=None))


@pytest.mark.parametrize("value, name", [("yes", "str"), (1, "int"), (0, "int"), (1.0, "float")])
def test_other_values_are_a_type_error(value, name):
    with pytest.raises(TypeError, match=f"^distributed must be None, a bool or a Communicator, got {name}$"):
        _communicator(value, None)


def test_true_without_a_process_group_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        _communicator(True, None)


def test_none_and_true_follow_the_ddp_models_group(gloo_group):  # noqa: F811
    group = dist.new_group([0])
    ddp = SimpleNamespace(process_group=group)
    for distributed in (None, True):
        comm = _communicator(distributed, ddp)
        assert type(comm) is TorchCommunicator and comm.group is group, distributed
    comm = _communicator(True, None)  # no model group: the default group
    assert type(comm) is TorchCommunicator and comm.group is None
    assert (comm.rank, comm.world_size, comm.backend) == (0, 1, "gloo")


def test_an_optimizer_on_a_ddp_model_trains_over_its_group(gloo_group):  # noqa: F811
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = KFAC(ddp, lr=0.1, damping=0.5)
    comm = opt.data_parallel.comm
    assert type(comm) is TorchCommunicator and comm.group is ddp.process_group
    with pytest.raises(ValueError, match="^" + re.escape(DDP_FALSE) + "$"):
        KFAC(ddp, lr=0.1, damping=0.5, distributed=False)
    assert type(KFAC(model, lr=0.1, damping=0.5).data_parallel.comm) is LocalCommunicator
