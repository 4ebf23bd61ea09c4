"""The fused routed expert mix agrees with the per-expert loop, values and gradients."""

import pytest
import torch

from mtlora.experts import gated_lora_mix, routed_expert_mix, routed_expert_mix_loop


def _inputs(num_groups: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    code = torch.randn(40, 8, generator=generator).to(dtype).requires_grad_()
    weights = torch.softmax(torch.randn(40, num_groups, 4, generator=generator), -1).to(dtype).requires_grad_()
    up = torch.randn(4, 32, 8, generator=generator).to(dtype).requires_grad_()
    return code, weights, up


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("num_groups", [1, 2, 8, 32])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_mix_matches_loop_with_gradients(num_groups, dtype, tolerance):
    fused_inputs, loop_inputs = _inputs(num_groups, dtype), _inputs(num_groups, dtype)
    fused, loop = routed_expert_mix(*fused_inputs), routed_expert_mix_loop(*loop_inputs)
    assert _relative_error(fused, loop) < tolerance
    upstream = torch.randn_like(fused.float()).to(dtype)
    fused.backward(upstream)
    loop.backward(upstream)
    for fused_tensor, loop_tensor in zip(fused_inputs, loop_inputs):
        assert _relative_error(fused_tensor.grad, loop_tensor.grad) < tolerance


def test_scalar_routing_with_one_hot_weights_selects_one_expert():
    code, _, up = _inputs(1, torch.float64)
    one_hot = torch.zeros(40, 1, 4, dtype=torch.float64)
    one_hot[:, 0, 2] = 1.0
    torch.testing.assert_close(routed_expert_mix(code, one_hot, up), code @ up[2].t())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_lora_mix_matches_a_loop_over_experts_with_gradients(dtype, tolerance):
    def inputs():
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randn(3, 5, 16, generator=generator).to(dtype).requires_grad_()
        lora_A = torch.randn(4, 2, 16, generator=generator).to(dtype)
        lora_B = torch.randn(4, 24, 2, generator=generator).to(dtype)
        gates = torch.softmax(torch.randn(3, 4, generator=generator), -1).to(dtype).requires_grad_()
        return tokens, lora_A, lora_B, gates

    fused_inputs, loop_inputs = inputs(), inputs()
    fused = gated_lora_mix(*fused_inputs)
    tokens, lora_A, lora_B, gates = loop_inputs
    loop = sum(gates[:, i, None, None] * (tokens @ lora_A[i].t() @ lora_B[i].t()) for i in range(4))
    assert fused.shape == (3, 5, 24) and _relative_error(fused, loop) < tolerance
    upstream = torch.randn_like(fused.float()).to(dtype)
    fused.backward(upstream)
    loop.backward(upstream)
    for index in (0, 3):  # tokens and gates
        assert _relative_error(fused_inputs[index].grad, loop_inputs[index].grad) < tolerance
