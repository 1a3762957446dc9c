"""Shared test settings.

The tests use tiny tensors, where torch's intra-op thread hand-offs cost more than the work, and vary wildly on a
busy machine. One thread keeps the suite fast and its run time steady; multi-process tests set their own.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
