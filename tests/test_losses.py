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
    for form in ("reference", "singular_basis"):
        loss = spectral_loss(model, form)
        assert not torch.isnan(loss) and 0.0 <= loss.item() < 1e-25  # only the reference's c = 0 + 1e-8 is left


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


def test_reference_penalty_gradient_treats_c_as_a_constant():
    up = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    spectral_penalty_reference(up).backward()
    # by hand: c is a number from the detached B, w comes from the SVD without gradient
    with torch.no_grad():
        sigma = torch.linalg.svdvals(up)
        w = torch.exp(-sigma / (sigma.mean() + 1e-8))
        c = up.norm().item() / 2 ** 0.5 + 1e-8
    b = up.detach().clone().requires_grad_()
    d = b.t() @ b - c * c * torch.eye(2, dtype=torch.float64)
    ((w[:, None] * w[None, :] * d) ** 2).sum().backward()
    torch.testing.assert_close(up.grad, b.grad)
    differentiable_c = up.detach().clone().requires_grad_()  # the form that lets c carry a gradient differs
    d2 = differentiable_c.t() @ differentiable_c - differentiable_c.pow(2).sum() / 2 * torch.eye(2, dtype=torch.float64)
    ((w[:, None] * w[None, :] * d2) ** 2).sum().backward()
    assert not torch.allclose(differentiable_c.grad, up.grad)


def test_spectral_sample_is_python_random_sample_of_the_module_ordered_matrices(monkeypatch):
    import random

    from mtlora import losses

    model = attach_adapters(tiny_llama(), AdapterConfig(method="hydralora", lora_nums=8))  # 4 modules x 8 = 32 B's
    matrices = losses.expert_up_projections(model)
    assert len(matrices) == 32
    seen = []
    monkeypatch.setitem(losses.SPECTRAL_PENALTIES, "reference", lambda up: seen.append(up) or up.sum() * 0)
    state = random.getstate()
    losses.spectral_loss(model, "reference", max_matrices=5, step=499)
    assert random.getstate() == state  # the global random state is left alone
    random.seed(499)
    expected = random.sample(matrices, 5)  # the reference: random.seed(global_step); random.sample(matrices, 64)
    random.setstate(state)
    assert [m.data_ptr() for m in seen] == [m.data_ptr() for m in expected]  # the same B's (views), same order


def _router_gradients(blc_mode: str, blc_alpha: float) -> torch.Tensor:
    from mtlora.losses import AuxiliaryLosses
    from mtlora.trainer import AdapterTrainer

    torch.manual_seed(0)
    model = attach_adapters(tiny_llama(), AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True,
                                                        lora_dropout=0.0))
    for adapter in routed_adapters(model).values():
        torch.nn.init.normal_(adapter.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
    trainer = AdapterTrainer.__new__(AdapterTrainer)  # just its loss: no optimiser, data or arguments needed
    trainer.aux_losses = AuxiliaryLosses(enable_blc=True, blc_alpha=blc_alpha, blc_mode=blc_mode)
    trainer.adapter_config, trainer._aux_totals, trainer._aux_counts = AdapterConfig(), {}, {}
    model.train()
    loss = model(TOKENS, labels=TOKENS).loss + trainer._auxiliary_loss(model)
    loss.backward()
    return torch.cat([a.router.weight.grad.flatten() for a in routed_adapters(model).values()])


def test_reference_blc_mode_logs_the_balance_loss_but_trains_nothing_with_it():
    without = _router_gradients("reference", 0.0)
    torch.testing.assert_close(_router_gradients("reference", 10.0), without, rtol=0, atol=0)
    assert not torch.allclose(_router_gradients("live", 10.0), without)
