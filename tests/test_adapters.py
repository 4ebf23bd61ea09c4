"""Attachment: identity at init, only adapters trainable, block adapters read the normalised input."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mtlora.adapters import RoutedLowRankAdapter
from mtlora.config import AdapterConfig, AdapterConfigError
from mtlora.injection import adapter_modules, attach_adapters, detach_adapters, routed_adapters, set_expert_mix
from tests.helpers import ADAPTER_MATRIX, adapter_config, randomize_adapters, tiny_llama
TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ADAPTER_MATRIX)
def test_adapters_are_identity_at_init_and_only_they_train(name):
    model = tiny_llama()
    reference = model(TOKENS).logits
    attach_adapters(model, adapter_config(name))
    torch.testing.assert_close(model(TOKENS).logits, reference, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_bottleneck_style_is_not_identity_at_init_as_in_reference():
    model = tiny_llama()
    reference = model(TOKENS).logits
    attach_adapters(model, AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True,
                                         block_adapter_style="bottleneck"))
    assert not torch.allclose(model(TOKENS).logits, reference)


@pytest.mark.parametrize("block_type, hosts", [("ffn", ["mlp"]), ("attention", ["self_attn"]), ("both", ["self_attn", "mlp"])])
def test_block_adapters_sit_on_the_right_sub_blocks(block_type, hosts):
    model = tiny_llama()
    attach_adapters(model, AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True, block_adapter_type=block_type))
    names = sorted(adapter_modules(model))
    expected = sorted(f"model.layers.{i}.{host}.adapter" for i in range(2) for host in hosts)
    assert names == expected


def test_block_ffn_adds_adapter_of_the_normalised_input_to_the_mlp_output():
    model = tiny_llama()
    attach_adapters(model, AdapterConfig(method="mtlora", lora_nums=4, enable_block_adapter=True))
    layer = model.model.layers[0]
    torch.nn.init.normal_(layer.mlp.adapter.lora_B, std=0.1)
    captured = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.update(norm_out=out))
    layer.mlp.register_forward_hook(lambda m, a, out: captured.update(mlp_in=a[0], mlp_out=out))
    model(TOKENS)
    u = captured["mlp_in"]
    torch.testing.assert_close(u, captured["norm_out"])  # the adapter reads LN(x), the MLP's own input
    base_only = layer.mlp.down_proj(layer.mlp.act_fn(layer.mlp.gate_proj(u)) * layer.mlp.up_proj(u))
    torch.testing.assert_close(captured["mlp_out"], base_only + layer.mlp.adapter(u))


def test_component_level_adapter_adds_to_the_target_linear():
    model = tiny_llama()
    attach_adapters(model, AdapterConfig(method="hydralora", lora_nums=4))
    q_proj = model.model.layers[1].self_attn.q_proj
    torch.nn.init.normal_(q_proj.adapter.lora_B, std=0.1)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q_proj(x), x @ q_proj.weight.t() + q_proj.adapter(x))


@pytest.mark.parametrize("model_class, config_class", [(Qwen2ForCausalLM, Qwen2Config), (MistralForCausalLM, MistralConfig)])
def test_attaches_to_qwen2_and_mistral_architectures(model_class, config_class):
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)
    for method in (dict(method="hydralora", lora_nums=4), dict(method="mtlora", lora_nums=4, enable_block_adapter=True,
                                                               block_adapter_type="both")):
        torch.manual_seed(0)
        model = model_class(config).eval()
        reference = model(TOKENS).logits
        attach_adapters(model, AdapterConfig(**method))
        assert adapter_modules(model)
        torch.testing.assert_close(model(TOKENS).logits, reference, rtol=0, atol=0)


def test_fine_grained_routing_gives_one_weight_per_group():
    adapter = RoutedLowRankAdapter(64, 64, rank=4, num_experts=3, scaling=1.0, num_groups=8)
    weights = adapter.routing_weights(torch.randn(5, 64))
    assert weights.shape == (5, 8, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 8))


def test_unknown_target_module_is_rejected_with_available_names():
    with pytest.raises(AdapterConfigError, match="--trainable: no linear layer named \\['qkv'\\]; available: .*q_proj"):
        attach_adapters(tiny_llama(), AdapterConfig(method="hydralora", trainable=["qkv"]))


def test_group_size_must_divide_the_adapted_width():
    with pytest.raises(AdapterConfigError, match="--routing_group_size 24 does not divide"):
        attach_adapters(tiny_llama(), AdapterConfig(method="mtlora", enable_fine_grained_routing=True, routing_group_size=24))


@pytest.mark.parametrize("name", ADAPTER_MATRIX)
def test_detach_adapters_restores_the_base_model(name):
    model = tiny_llama()
    with torch.no_grad():
        before = model(TOKENS).logits
        randomize_adapters(attach_adapters(model, adapter_config(name)))
        assert not torch.allclose(model(TOKENS).logits, before)  # random adapters do change the output
        detach_adapters(model)
        torch.testing.assert_close(model(TOKENS).logits, before, rtol=0, atol=0)
    assert not adapter_modules(model) and not any(p.requires_grad for p in model.parameters())
    attach_adapters(model, adapter_config(name))  # and the model takes adapters again


@pytest.mark.parametrize("name", [n for n in ADAPTER_MATRIX if adapter_config(n).is_routed])
def test_loop_expert_mix_computes_the_fused_function(name):
    model = randomize_adapters(attach_adapters(tiny_llama(), adapter_config(name, lora_dropout=0.0)))
    assert routed_adapters(model)
    with torch.no_grad():
        fused = model(TOKENS).logits
        set_expert_mix(model, "loop")
        loop = model(TOKENS).logits
    torch.testing.assert_close(loop, fused, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expert mix must be one of fused, loop"):
        set_expert_mix(model, "grouped")


def test_component_level_scalar_routing_gives_every_expert_its_own_dropout_mask():
    adapter = RoutedLowRankAdapter(16, 8, rank=4, num_experts=3, scaling=2.0, dropout=0.5, dropout_per_expert=True)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(5, 16)
    masks = (torch.rand(3, 5, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    class KnownMasks(torch.nn.Module):  # a known mask per expert, in the order the adapter asks for them
        def forward(self, tokens):
            return tokens * masks

    adapter.dropout = KnownMasks()
    weights = adapter.routing_weights(x)[:, 0]  # (5, 3)
    expected = sum(weights[:, i:i + 1] * 2.0 * (masks[i] * x) @ adapter.lora_A.t() @ adapter.lora_B[i].t()
                   for i in range(3))
    torch.testing.assert_close(adapter.train()(x), expected)
    adapter.dropout = torch.nn.Dropout(0.5)
    torch.testing.assert_close(adapter.eval()(x), sum(weights[:, i:i + 1] * 2.0 * x @ adapter.lora_A.t()
                                                      @ adapter.lora_B[i].t() for i in range(3)))


def test_per_expert_masks_recomputed_in_backward_give_the_kept_masks_results_and_keep_e_times_less():
    """The per-expert masked inputs are recomputed for the backward pass (the RNG state restored): outputs and
    gradients equal computing them once and keeping them, bit for bit, and the E masked copies are not saved."""
    adapter = RoutedLowRankAdapter(16, 8, rank=4, num_experts=3, scaling=2.0, dropout=0.5, dropout_per_expert=True)
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def kept(tokens):  # the masked copies computed once and kept for backward
        masked = adapter.dropout(tokens.reshape(-1, 16).expand(3, 10, 16))
        code = (masked @ adapter.lora_A.t()).transpose(0, 1)
        weights = adapter._routing_probabilities(tokens.reshape(-1, 16)) * adapter.scaling
        return adapter.expert_mix(code, weights, adapter.lora_B).reshape(2, 5, 8)

    results = []
    for forward in (adapter.train(), kept):
        torch.manual_seed(7)
        out = forward(x)
        out.square().sum().backward()
        results.append([out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in adapter.parameters()])
        x.grad = None
        adapter.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            torch.manual_seed(7)
            forward(x)
        results[-1].append(max(saved))
    recomputed, reference = results
    assert all(torch.equal(a, b) for a, b in zip(recomputed[:-1], reference[:-1]))
    assert reference[-1] == 3 * 10 * 16 and recomputed[-1] < reference[-1]  # no (E, N, d_in) tensor is saved


@pytest.mark.parametrize("name, per_expert", [("hydralora", True), ("component-fgr", False), ("block-ffn", False)])
def test_the_reference_draws_a_mask_per_expert_only_with_scalar_routing_at_the_component_level(name, per_expert):
    model = attach_adapters(tiny_llama(), adapter_config(name, lora_dropout=0.1))
    assert {a.dropout_per_expert for a in routed_adapters(model).values()} == {per_expert}
    shared = attach_adapters(tiny_llama(), adapter_config(name, lora_dropout=0.1, expert_dropout="shared"))
    assert not any(a.dropout_per_expert for a in routed_adapters(shared).values())
