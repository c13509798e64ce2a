"""The small-batch linear: the same product as ``F.linear``, taken where a CPU computes it faster."""

import pytest
import torch
from torch import nn

import onlinespec.cpu_linear as cpu_linear
from onlinespec.cpu_linear import SmallBatchLinear, plain_linears, project, use_small_batch_linears
from tests.tiny import tiny_llama


WIDE = cpu_linear.MIN_WEIGHTS // 64  # a weight [WIDE, 64] is calibrated, [96, 64] is not


@pytest.fixture
def decided(monkeypatch):
    """Decisions set by the test (the shapes below), the process's own restored after."""
    table = {}
    monkeypatch.setattr(cpu_linear, "_faster", table)
    return table


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 17, 48, 300])
@pytest.mark.parametrize("columns", [96, WIDE])
def test_project_is_f_linear(rows, columns, transposed, decided):
    decided[(WIDE, 64, torch.float32)] = frozenset(cpu_linear.ROW_BUCKETS if transposed else ())
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


def test_which_product_is_taken_follows_the_decisions(monkeypatch, decided):
    decided[(WIDE, 64, torch.float32)] = frozenset({3, 16})
    taken = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: taken.append(b.shape[1]) or real_mm(a, b))
    weight = torch.randn(WIDE, 64)
    narrow = torch.randn(16, 64)  # below MIN_WEIGHTS: F.linear, never calibrated
    with torch.inference_mode():
        for rows in (1, 2, 3, 9, 12, 16, 300):  # 3 and 13..16 fall in the buckets 3 and 16
            project(torch.randn(rows, 64), weight)
            project(torch.randn(rows, 64), narrow)
        with plain_linears():
            project(torch.randn(3, 64), weight)
    assert taken == [3, 16]
    assert (16, 64, torch.float32) not in decided


def test_calibration_takes_the_transposed_product_only_where_it_measured_faster(monkeypatch, decided):
    """Decided from timings on the machine at hand: here the plain product is made slow at 3 rows
    and the transposed one at every other row count, so only 3 rows may take it (a shape seen
    once is not measured again), and a weight first met in a product is calibrated then."""
    import time as clock
    real_linear, real_mm = nn.functional.linear, torch.mm

    def slow_linear(x, w, b=None):
        if x.shape[0] == 3:
            clock.sleep(0.004)
        return real_linear(x, w, b)

    def slow_mm(a, b):
        if b.shape[1] != 3:
            clock.sleep(0.004)
        return real_mm(a, b)
    monkeypatch.setattr(nn.functional, "linear", slow_linear)
    monkeypatch.setattr(torch, "mm", slow_mm)
    weights = [torch.randn(WIDE, 64) for _ in range(2)]
    assert cpu_linear.calibrate([*weights, torch.randn(96, 64)]) == {(WIDE, 64, torch.float32): (3,)}
    monkeypatch.setattr(nn.functional, "linear", real_linear)
    assert cpu_linear.calibrate(weights) == {(WIDE, 64, torch.float32): (3,)}  # kept, not measured again
    with torch.inference_mode():
        project(torch.randn(5, 32), torch.randn(2 * WIDE, 32))  # a new shape: calibrated on first use
    assert cpu_linear.decisions()[(2 * WIDE, 32, torch.float32)] == ()  # its transposed product is slow


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
