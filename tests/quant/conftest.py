"""Quant tests run their many small tensor ops on one thread: on a shared 2-core machine the
second OpenMP thread mostly waits to be scheduled, which makes each op ~100× slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
