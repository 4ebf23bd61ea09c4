"""Balance loss and the two forms of spectral regularisation on hand-checkable cases."""

import torch

from mtlora.config import AdapterConfig
from mtlora.injection import attach_adapters, routed_adapters
from mtlora.losses import (
    AuxiliaryLosses, balance_loss, spectral_loss, spectral_penalty_reference, spectral_penalty_singular_basis,
    squared_coefficient_of_variation,
)
from tests.helpers import tiny_llama

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def test_cv_squared_is_zero_for_uniform_and_positive_otherwise():
    assert squared_coefficient_of_variation(torch.full((4,), 0.25)) == 0
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    expected = p.var() / p.mean() ** 2
    torch.testing.assert_close(squared_coefficient_of_variation(p), expected)


def test_balance_loss_reaches_the_router_through_gradient_checkpointing():
    model = attach_adapters(tiny_llama(), AdapterConfig(method="hydralora", lora_nums=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(TOKENS, labels=TOKENS)
    loss = balance_loss(model)
    assert loss is not None and loss.item() > 0
    loss.backward()
    assert all(a.router.weight.grad is not None and a.router.weight.grad.abs().sum() > 0 for a in routed_adapters(model).values())


def test_spectral_penalties_are_zero_for_orthogonal_equal_norm_columns():
    q, _ = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64))
    up = 3.0 * q
    assert spectral_penalty_reference(up).abs() < 1e-10
    assert spectral_penalty_singular_basis(up).abs() < 1e-10


def test_forms_agree_when_the_singular_basis_is_the_standard_basis():
    q, _ = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64))
    up = q * torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # B = U S, V = I, sorted descending
    torch.testing.assert_close(spectral_penalty_reference(up), spectral_penalty_singular_basis(up))


def test_reference_penalty_matches_a_hand_computation():
    up = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    sigma = torch.linalg.svdvals(up)
    w = torch.exp(-sigma / sigma.mean())
    c2 = up.pow(2).sum() / 2
    d = up.t() @ up - c2 * torch.eye(2)
    expected = sum((w[j] * w[k] * d[j, k]) ** 2 for j in range(2) for k in range(2))
    torch.testing.assert_close(spectral_penalty_reference(up), expected)


def test_spectral_loss_is_zero_without_nan_when_experts_are_zero():
    model = attach_adapters(tiny_llama(), AdapterConfig(method="hydralora", lora_nums=4))
    loss = spectral_loss(model, "singular_basis")
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_spectral_schedule_matches_the_reference():
    every_500 = AuxiliaryLosses(enable_spectral_reg=True, spectral_reg_steps=500)
    assert [s for s in range(940) if every_500.spectral_due(s, steps_per_epoch=940)] == [499]
    per_epoch = AuxiliaryLosses(enable_spectral_reg=True)
    assert [s for s in range(30) if per_epoch.spectral_due(s, steps_per_epoch=10)] == [0, 10, 20]


def test_checkpoint_recompute_does_not_replace_the_recorded_routing():
    model = attach_adapters(tiny_llama(), AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(TOKENS, labels=TOKENS).loss
    recorded = [a.routing_mean for a in routed_adapters(model).values()]
    (loss + balance_loss(model)).backward()
    assert all(a.routing_mean is r for a, r in zip(routed_adapters(model).values(), recorded))
