"""LoRAHub: compose K trained ``--method lora`` adapters by a gradient-free search of mixing weights.

As in LoRAHub (Huang et al., 2023), the composed adapter is the element-wise weighted sum of the modules'
factors, A = sum_k w_k A_k and B = sum_k w_k B_k (so the update B A has cross terms w_j w_k B_j A_k), and
w minimises the LM loss on a few examples of the target task plus an L1 penalty. LoRAHub's code writes the
penalty as 0.05 * mean_k |w_k| (the paper: alpha * sum_k |w_k|); the mean form is used here, with
alpha = 0.05. Search: LoRAHub runs Nevergrad's CMA-ES with 40 evaluations, weights in [-1.5, 1.5],
starting from w = 0; :func:`minimize_cma` is a compact, seeded CMA-ES with the same budget, bounds and
start. The loss is the token-weighted mean cross-entropy over the examples' target tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mtlora.config import AdapterConfig
from mtlora.errors import InvalidInput
from mtlora.evaluation.batching import truncate_left
from mtlora.evaluation.bbh import NUM_EXEMPLARS, available_tasks, build_bbh_prompt, load_bbh_task
from mtlora.injection import adapter_modules, adapter_state_dict, attach_adapters
from mtlora.library import read_lora_modules
from mtlora.training_data import IGNORE_INDEX, PaddingCollator, tokenize_records

L1_ALPHA = 0.05
WEIGHT_BOUND = 1.5
DEFAULT_BUDGET = 40


# ------------------------------------------------------------------------------------------ optimiser

class BoundedCMAES:
    """(mu/mu_w, lambda) CMA-ES with cumulative step-size adaptation, candidates clipped to a box.

    Follows the standard update rules (Hansen's tutorial): rank-one and rank-mu covariance updates,
    log-linear recombination weights, lambda = 4 + floor(3 ln n). Clipping is the repair for the bounds:
    the clipped point is both evaluated and used in the update, so the search stays inside the box.
    """

    def __init__(self, x0: Sequence[float], sigma0: float, bounds: tuple[float, float], seed: int):
        self.dim = n = len(x0)
        self.mean = np.asarray(x0, dtype=float)
        self.sigma, self.bounds = sigma0, bounds
        self.rng = np.random.default_rng(seed)
        self.popsize = 4 + int(3 * math.log(n))
        self.mu = self.popsize // 2
        weights = math.log(self.mu + 0.5) - np.log(np.arange(1, self.mu + 1))
        self.weights = weights / weights.sum()
        self.mueff = 1.0 / float(np.sum(self.weights ** 2))
        self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
        self.cs = (self.mueff + 2) / (n + self.mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
        self.cmu = min(1 - self.c1, 2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n ** 2))  # E||N(0, I)||
        self.pc, self.ps = np.zeros(n), np.zeros(n)
        self.cov = np.eye(n)
        self.generation = 0

    def ask(self) -> np.ndarray:
        """A generation of ``popsize`` candidates, shape (popsize, n), inside the bounds."""
        eigenvalues, basis = np.linalg.eigh(self.cov)
        scales = np.sqrt(np.maximum(eigenvalues, 1e-20))
        steps = self.rng.standard_normal((self.popsize, self.dim)) @ (basis * scales).T
        return np.clip(self.mean + self.sigma * steps, *self.bounds)

    def tell(self, candidates: np.ndarray, values: Sequence[float]) -> None:
        """Update mean, evolution paths, covariance and step size from a full generation's values."""
        self.generation += 1
        n = self.dim
        best = (candidates[np.argsort(values)[: self.mu]] - self.mean) / self.sigma  # (mu, n) selected steps
        step = self.weights @ best
        self.mean = self.mean + self.sigma * step
        eigenvalues, basis = np.linalg.eigh(self.cov)
        inv_sqrt = basis @ np.diag(1 / np.sqrt(np.maximum(eigenvalues, 1e-20))) @ basis.T
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * inv_sqrt @ step
        ps_norm = float(np.linalg.norm(self.ps))
        stalled = ps_norm / math.sqrt(1 - (1 - self.cs) ** (2 * self.generation)) / self.chi_n >= 1.4 + 2 / (n + 1)
        h_sigma = 0.0 if stalled else 1.0
        self.pc = (1 - self.cc) * self.pc + h_sigma * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * step
        rank_mu = (best.T * self.weights) @ best
        self.cov = ((1 - self.c1 - self.cmu) * self.cov
                    + self.c1 * (np.outer(self.pc, self.pc) + (1 - h_sigma) * self.cc * (2 - self.cc) * self.cov)
                    + self.cmu * rank_mu)
        self.sigma *= math.exp((self.cs / self.damps) * (ps_norm / self.chi_n - 1))


def minimize_cma(objective: Callable[[np.ndarray], float], x0: Sequence[float], budget: int = DEFAULT_BUDGET,
                 seed: int = 42, bounds: tuple[float, float] = (-WEIGHT_BOUND, WEIGHT_BOUND),
                 sigma0: float | None = None) -> tuple[np.ndarray, float, list[tuple[np.ndarray, float]]]:
    """Minimise ``objective`` with at most ``budget`` evaluations; returns (best x, best value, history).

    ``x0`` is evaluated first, so the result is never worse than the start. ``sigma0`` defaults to a sixth
    of the box width (0.5 for [-1.5, 1.5]). A last, incomplete generation is evaluated but not told.
    """
    if budget < 1:
        raise InvalidInput(f"--budget must be >= 1, got {budget}")
    x0 = np.clip(np.asarray(x0, dtype=float), *bounds)
    history = [(x0, float(objective(x0)))]
    strategy = BoundedCMAES(x0, sigma0 or (bounds[1] - bounds[0]) / 6, bounds, seed)
    while len(history) < budget:
        candidates = strategy.ask()[: budget - len(history)]
        values = [float(objective(x)) for x in candidates]
        history.extend(zip(candidates, values))
        if len(candidates) == strategy.popsize:
            strategy.tell(candidates, values)
    best_x, best_value = min(history, key=lambda item: item[1])
    return best_x, best_value, history


# -------------------------------------------------------------------------------------- few-shot data

def records_to_examples(records: Sequence[dict], tokenizer, max_seq_length: int = 512) -> list[dict]:
    """Instruction records in the training format (``<bos>instruction[\\ninput]<eos>output<eos>``, loss on output)."""
    return [example for example, _ in tokenize_records(records, tokenizer, max_seq_length)]


def prompt_target_example(prompt: str, target: str, tokenizer, max_seq_length: int = 2048) -> dict:
    """An example scored on ``target`` after ``prompt``, tokenized as eval_bbh does (prompt with special tokens).

    Over-long prompts lose their start (the BOS stays), as in evaluation.
    """
    target_ids = tokenizer.encode(" " + target.strip(), add_special_tokens=False)
    prompt_ids = truncate_left(tokenizer(prompt).input_ids, max(1, max_seq_length - len(target_ids)),
                               keep_first=tokenizer.bos_token_id)
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def bbh_exemplar_examples(data_dir: str | Path, tokenizer, tasks: Sequence[str] | None = None,
                          max_seq_length: int = 2048) -> list[dict]:
    """The 3 exemplars of every BBH task, each in the eval prompt format with the other two as shots.

    Exemplar j becomes "Q: {x_i}\\nA: {y_i}\\n\\n" for the two others, then "Q: {x_j}\\nA:", scored on
    " {y_j}": the 3-shot prompt of eval_bbh with the scored exemplar left out of its own context. The
    scored test items are never used.
    """
    examples = []
    for task in tasks or available_tasks(data_dir):
        exemplars = load_bbh_task(Path(data_dir) / f"{task}.json")[:NUM_EXEMPLARS]
        for j, item in enumerate(exemplars):
            shots = exemplars[:j] + exemplars[j + 1:]
            examples.append(prompt_target_example(build_bbh_prompt(shots, item["input"]), item["target"], tokenizer,
                                                  max_seq_length))
    return examples


# ---------------------------------------------------------------------------------------- composition

def _check_module_keys(model: nn.Module, checkpoints: Sequence, modules: Sequence[dict]) -> None:
    expected = {k: v.shape for k, v in adapter_state_dict(model).items()}
    for path, module in zip(checkpoints, modules):
        if {k: v.shape for k, v in module.items()} != expected:
            raise InvalidInput(f"--lora_checkpoints {path}: its tensors do not match the model's adapters "
                             "(different base model or targets?)")


@torch.no_grad()
def set_composition(model: nn.Module, modules: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> None:
    """Write sum_k w_k theta_k into every adapter tensor of ``model`` (A and B alike, element-wise)."""
    params = dict(model.named_parameters())
    for name in modules[0]:
        composed = sum(float(w) * module[name].double() for w, module in zip(weights, modules))
        params[name].copy_(composed.to(params[name].dtype))


@torch.no_grad()
def example_loss(model: nn.Module, batches: Sequence[dict], device: str | torch.device) -> float:
    """Token-weighted mean cross-entropy of the target tokens over all batches."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def compose_lora_modules(model: nn.Module, checkpoints: Sequence[str | Path], examples: Sequence[dict], tokenizer,
                         budget: int = DEFAULT_BUDGET, seed: int = 42, alpha: float = L1_ALPHA, batch_size: int = 8,
                         trace: list | None = None) -> tuple[list[float], AdapterConfig]:
    """Search LoRAHub mixing weights on ``examples`` and leave the best composition in ``model``.

    ``model`` is a base model (the LoRA adapters are attached here) or one already carrying adapters of
    the same config. ``examples`` are dicts with ``input_ids`` and ``labels`` (-100 = not scored), e.g.
    from :func:`records_to_examples` or :func:`bbh_exemplar_examples`. Each evaluation is appended to
    ``trace`` (if given) as {"weights", "loss", "objective"}. Returns (weights, adapter config).
    """
    if not examples:
        raise InvalidInput("no few-shot examples to compose on")
    config, modules = read_lora_modules(checkpoints)
    if not adapter_modules(model):
        attach_adapters(model, config)
    _check_module_keys(model, checkpoints, modules)
    model.eval()
    device = next(model.parameters()).device
    collate = PaddingCollator(tokenizer.pad_token_id)
    items = [{**example, "task_id": 0} for example in examples]
    batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    progress = tqdm(total=budget, desc="lorahub", leave=False)

    def objective(weights: np.ndarray) -> float:
        set_composition(model, modules, weights)
        loss = example_loss(model, batches, device)
        value = loss + alpha * float(np.mean(np.abs(weights)))
        if trace is not None:
            trace.append({"weights": [float(w) for w in weights], "loss": loss, "objective": value})
        progress.update()
        return value

    best, _, _ = minimize_cma(objective, np.zeros(len(modules)), budget, seed)
    progress.close()
    set_composition(model, modules, best)
    return [float(w) for w in best], config
