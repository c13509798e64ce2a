import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

from tests.tiny import perturbed, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def target():
    return tiny_llama(layers=2, hidden=64, seed=0)


@pytest.fixture(scope="session")
def close_drafter_model(target):
    """Agrees with the target often: long accepted blocks and some rejections."""
    return perturbed(target, 0.05, seed=1)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
