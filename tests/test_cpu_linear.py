"""The small-batch linear: the same product as ``F.linear``, taken where a CPU computes it faster."""

import pytest
import torch
from torch import nn

import onlinespec.cpu_linear as cpu_linear
from onlinespec.cpu_linear import SmallBatchLinear, plain_linears, project, use_small_batch_linears
from tests.tiny import tiny_llama


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 17, 48, 300])
@pytest.mark.parametrize("columns", [96, cpu_linear.WIDE])
def test_project_is_f_linear(rows, columns):
    g = torch.Generator().manual_seed(rows * 7 + columns)
    x = torch.randn(rows, 64, generator=g)
    weight, bias = torch.randn(columns, 64, generator=g), torch.randn(columns, generator=g)
    with torch.inference_mode():
        ours, ref = project(x, weight, bias), nn.functional.linear(x, weight, bias)
        assert ours.shape == ref.shape and ours.is_contiguous()
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5)
        # leading dimensions, as a model's [B, T, H] activations have
        x3 = x.reshape(1, rows, 64)
        assert torch.allclose(project(x3, weight), nn.functional.linear(x3, weight), atol=1e-4, rtol=1e-5)


def test_which_product_is_taken(monkeypatch):
    taken = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: taken.append(tuple(a.shape)) or real_mm(a, b))
    weight = torch.randn(cpu_linear.WIDE, 8)
    narrow = torch.randn(16, 8)
    with torch.inference_mode():
        project(torch.randn(1, 8), narrow)  # one row: the matrix-vector product F.linear does
        project(torch.randn(3, 8), narrow)  # a few rows: transposed
        project(torch.randn(cpu_linear.FEW_ROWS + 1, 8), narrow)  # more: F.linear
        project(torch.randn(cpu_linear.MANY_ROWS[1] + 1, 8), narrow)  # a prefill: F.linear
        project(torch.randn(cpu_linear.FEW_ROWS + 1, 8), weight)  # a wide head: transposed up to 48 rows
        project(torch.randn(cpu_linear.MANY_ROWS[1] + 1, 8), weight)
        with plain_linears():
            project(torch.randn(3, 8), narrow)
    assert taken == [(16, 8), (cpu_linear.WIDE, 8)]


def test_gradients_take_the_plain_path_and_flow():
    layer = use_small_batch_linears(nn.Sequential(nn.Linear(8, 4)))[0]
    assert type(layer) is SmallBatchLinear
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_a_model_keeps_its_parameters_and_logits():
    model = tiny_llama(layers=2, hidden=64, heads=4, seed=11)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        ref = model(ids).logits
        keys = list(model.state_dict())
        use_small_batch_linears(use_small_batch_linears(model))  # idempotent
        assert list(model.state_dict()) == keys
        assert all(type(m) is not nn.Linear for m in model.modules())
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
