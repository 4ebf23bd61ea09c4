"""Does the balance loss train the routers under gradient checkpointing? Measured, not assumed.

The balance loss reads a routing statistic that each adapter stores as an attribute inside its forward
pass, which runs inside the checkpointed decoder layer. Under reentrant checkpointing
(``torch.utils.checkpoint(..., use_reentrant=True)``) that first forward runs under ``no_grad``, so the
stored statistic, and the loss built from it, would be constants. This script trains one step of a
tiny random 2-layer LLaMA through the Hugging Face ``Trainer`` (``gradient_checkpointing=True``) and
records, for each checkpointing mode:

(a) whether the balance term requires grad;
(b) ||g_router(LM + 0.01 * CV^2) - g_router(LM)||: the router gradient the balance term contributes;
(c) the gradients the LM loss alone gives the routers and the other adapter weights, and whether
    they equal those of the same step without checkpointing.

Modes: checkpointing off (ground truth); the installed transformers' default kwargs; use_reentrant
True; use_reentrant False. Each with ``enable_input_require_grads()`` called before training, as the
reference train.py does, and without it. Adapters (``--adapters``):

* ``toy``: a routed low-rank delta hooked onto each MLP, storing ``routing_mean`` in its forward, with
  a ``compute_loss`` override that adds ``blc_alpha * mean CV^2`` like the reference trainer. Needs
  only torch + transformers, so it runs under transformers 4.36.2 as well as 5.x.
* ``project``: this package's block-level mtLoRA adapters (``attach_adapters``) and ``AdapterTrainer``.

The adapters' up-projections start random (not zero), so that the LM loss reaches the routers.

    PYTHONPATH=. python scripts/fidelity/reentrant_balance_check.py --adapters toy --output out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

BLC_ALPHA = 0.01
SEQ_LEN, BATCH = 16, 4
CHECKPOINTING = {  # mode name -> (gradient_checkpointing, gradient_checkpointing_kwargs)
    "off": (False, None),
    "default": (True, None),
    "reentrant": (True, {"use_reentrant": True}),
    "non_reentrant": (True, {"use_reentrant": False}),
}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def training_batch() -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 128, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()} for t in tokens]


# ---- toy adapters (no dependency on this package) -------------------------------------------------

class RoutedDelta(nn.Module):
    """delta(x) = sum_e softmax(router(x))_e * B_e A x; stores the mean routing weight per expert."""

    def __init__(self, dim: int, rank: int = 4, num_experts: int = 4):
        super().__init__()
        self.lora_A = nn.Linear(dim, rank, bias=False)
        self.lora_B = nn.Parameter(0.02 * torch.randn(num_experts, dim, rank))  # random: LM grads reach the router
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.routing_mean = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, dim)
        probs = torch.softmax(self.router(x), dim=-1)  # (batch, seq, E)
        self.routing_mean = probs.reshape(-1, probs.shape[-1]).mean(0)  # (E,), as the reference stores it
        return torch.einsum("bse,edr,bsr->bsd", probs, self.lora_B, self.lora_A(x))


def _add_delta(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + mlp.adapter(args[0])


def attach_toy_adapters(model: LlamaForCausalLM) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp.add_module("adapter", RoutedDelta(model.config.hidden_size))
        layer.mlp.register_forward_hook(_add_delta)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


class ToyBalanceTrainer(Trainer):
    """compute_loss = LM loss + blc_alpha * mean over adapters of CV^2(routing_mean), as the reference."""

    def __init__(self, *args, blc_alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.blc_alpha = blc_alpha

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs)
        loss = outputs.loss
        if self.blc_alpha > 0:
            adapters = [m for m in model.modules() if isinstance(m, RoutedDelta) and m.routing_mean is not None]
            balance = torch.stack([cv_squared(m.routing_mean) for m in adapters]).mean()
            for m in adapters:
                m.routing_mean = None  # the reference resets after collecting
            self.balance_requires_grad = balance.requires_grad
            loss = loss + self.blc_alpha * balance
        return (loss, outputs) if return_outputs else loss


# ---- this package's adapters ---------------------------------------------------------------------

def project_setup(model: LlamaForCausalLM, blc_alpha: float):
    """Attach block-level mtLoRA adapters; returns (trainer class, trainer kwargs)."""
    from mtlora.config import AdapterConfig
    from mtlora.injection import attach_adapters
    from mtlora.trainer import AdapterTrainer, AuxiliaryLosses

    config = AdapterConfig(method="mtlora", lora_rank=4, lora_nums=4, lora_dropout=0.0, enable_block_adapter=True)
    attach_adapters(model, config)
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(param, std=0.02)  # random: LM grads reach the router

    class ProbedAdapterTrainer(AdapterTrainer):
        def _auxiliary_loss(self, model):
            total = super()._auxiliary_loss(model)
            if self.aux_losses.enable_blc:
                self.balance_requires_grad = total.requires_grad
            return total

    losses = AuxiliaryLosses(enable_blc=blc_alpha > 0, blc_alpha=blc_alpha)
    return ProbedAdapterTrainer, {"adapter_config": config, "aux_losses": losses}


# ---- one measured training step ------------------------------------------------------------------

class GradProbe:
    """Trainer mixin: keeps the gradients of the first training step (before clipping)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.grads = {n: None if p.grad is None else p.grad.detach().clone()
                      for n, p in self.model.named_parameters() if p.requires_grad}
        return loss


def one_step(adapters: str, mode: str, input_grads: bool, blc_alpha: float) -> dict:
    model = tiny_llama(seed=0)
    if adapters == "toy":
        attach_toy_adapters(model)
        trainer_cls, extra = ToyBalanceTrainer, {"blc_alpha": blc_alpha}
    else:
        trainer_cls, extra = project_setup(model, blc_alpha)
    if input_grads:
        model.enable_input_require_grads()  # reference train.py does this (twice) before training
    grad_mode_in_first_forward = []
    for name, module in model.named_modules():
        if name.endswith(".adapter"):
            module.register_forward_pre_hook(lambda *_: grad_mode_in_first_forward.append(torch.is_grad_enabled()))

    checkpointing, gc_kwargs = CHECKPOINTING[mode]
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=1, per_device_train_batch_size=BATCH, learning_rate=1e-3,
            gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs, report_to="none",
            save_strategy="no", logging_strategy="no", remove_unused_columns=False, disable_tqdm=True, seed=0,
        )
        trainer = type("Probe", (GradProbe, trainer_cls), {})(model=model, args=args, train_dataset=training_batch(), **extra)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics
                trainer.train()
        except RuntimeError as error:  # e.g. nothing in the loss requires grad
            return {"error": str(error).splitlines()[0]}

    checkpoint_funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    return {
        "checkpoint_kwargs": dict(checkpoint_funcs[0].keywords) if checkpoint_funcs and checkpointing else None,
        "grad_enabled_in_first_adapter_forward": grad_mode_in_first_forward[0],
        "balance_requires_grad": getattr(trainer, "balance_requires_grad", None),
        "input_require_grads_hook": hasattr(model, "_require_grads_hook"),  # set by enable_input_require_grads
        "grads": trainer.grads,
    }


def norm(tensors: list) -> float:
    present = [t for t in tensors if t is not None]
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in present))) if present else 0.0


def difference(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a - b, a missing gradient counting as zero."""
    if a is None or b is None:
        return b if a is None and b is None else (a if b is None else -b)
    return a - b


def grad_summary(grads: dict, reference: dict | None = None) -> dict:
    """Norms of the router and other adapter gradients; with ``reference``, norms of the differences."""
    summary = {}
    for label, is_router in (("router", True), ("adapter_other", False)):
        names = [n for n in grads if ("router" in n) == is_router]
        summary[f"{label}_grad_norm"] = norm([grads[n] for n in names])
        summary[f"{label}_params_without_grad"] = sum(grads[n] is None for n in names)
        if reference is not None:
            summary[f"{label}_grad_diff_norm"] = norm([difference(grads[n], reference[n]) for n in names])
    return summary


def run(adapters: str) -> dict:
    cases = [("off", True)] + [(mode, ig) for mode in ("default", "reentrant", "non_reentrant") for ig in (True, False)]
    truth_lm = truth_both = None
    results = []
    for mode, input_grads in cases:
        lm = one_step(adapters, mode, input_grads, blc_alpha=0.0)
        both = one_step(adapters, mode, input_grads, blc_alpha=BLC_ALPHA)
        truth_lm, truth_both = truth_lm or lm["grads"], truth_both or both["grads"]
        row = {"checkpointing": mode, "enable_input_require_grads": input_grads}
        if "error" in lm or "error" in both:
            row["error"] = lm.get("error") or both.get("error")
            print(f"{mode:>13} input_grads={input_grads!s:5} training fails: {row['error']}")
            results.append(row)
            continue
        row.update({
            "checkpoint_kwargs": lm["checkpoint_kwargs"],
            "grad_enabled_in_first_adapter_forward": lm["grad_enabled_in_first_adapter_forward"],
            "input_require_grads_hook_after_training": lm["input_require_grads_hook"],
            "a_balance_requires_grad": both["balance_requires_grad"],
            "b_balance_contribution": grad_summary(both["grads"], reference=lm["grads"]),
            "c_lm_only": grad_summary(lm["grads"]),
            "c_lm_only_vs_no_checkpointing": grad_summary(lm["grads"], reference=truth_lm),
            "lm_plus_balance_vs_no_checkpointing": grad_summary(both["grads"], reference=truth_both),
        })
        results.append(row)
        truth = row["c_lm_only_vs_no_checkpointing"]
        print(f"{mode:>13} input_grads={input_grads!s:5} (hook after: {row['input_require_grads_hook_after_training']!s:5}) "
              f"kwargs={row['checkpoint_kwargs']} "
              f"grad_in_fwd={row['grad_enabled_in_first_adapter_forward']!s:5} "
              f"(a) balance.requires_grad={row['a_balance_requires_grad']!s:5} "
              f"(b) router diff={row['b_balance_contribution']['router_grad_diff_norm']:.3e} "
              f"(c) LM router={row['c_lm_only']['router_grad_norm']:.3e} "
              f"other={row['c_lm_only']['adapter_other_grad_norm']:.3e} "
              f"vs no-ckpt={truth['router_grad_diff_norm'] + truth['adapter_other_grad_diff_norm']:.3e}")
    return {
        "adapters": adapters, "blc_alpha": BLC_ALPHA, "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": __import__("accelerate").__version__},
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", choices=("toy", "project"), default="toy")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    result = run(args.adapters)
    if args.output:  # one file for all runs, keyed by transformers version and adapters
        path = Path(args.output)
        everything = json.loads(path.read_text()) if path.is_file() else {}
        everything[f"transformers-{transformers.__version__}/{args.adapters}"] = result
        path.write_text(json.dumps(everything, indent=2) + "\n")

if __name__ == "__main__":
    main()
