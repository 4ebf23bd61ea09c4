"""The bad-input battery: every entry point, fed a bad flag or file, stops before loading a model with a message
naming the flag or the file (``file:line`` for a record).

One row per case: (entry point, argv, expected fragment). ``{name}`` in both is an input from :class:`Inputs`
(built on demand under the test's tmp_path); each entry point runs in-process through its ``main(argv)``, with
model loading forbidden (the ``no_model_loading`` fixture).
"""

from __future__ import annotations

import importlib
import json
import shutil
from functools import cached_property
from pathlib import Path

import pytest

from tests.helpers import (adapter_config, random_adapter_checkpoint, write_bbh_folder, write_lora_checkpoint,
                           write_mmlu_folder, write_multitask_records)

TRAIN = "--model_name_or_path {model} --data_path {records} --output_dir {out} --use_cpu "
EVAL_BBH = "--model_name_or_path {model} --data_dir {bbh} --output_dir {out} "
EVAL_MMLU = "--model_name_or_path {model} --data_dir {mmlu} --output_dir {out} "
EVAL_HELDOUT = "--model_name_or_path {model} --eval_file {records} --output_dir {out} "
EVAL_HARNESS = "--model_name_or_path {model} --tasks mmlu --mmlu_dir {mmlu} --output_dir {out} "
MERGE = "--method ties --output_dir {out} --model_name_or_path {model} "
LORAHUB = "--output_dir {out} --model_name_or_path {model} "
ANALYSIS = "--data_path {records} --output_dir {out} --model_name_or_path {model} "


def case(module: str, base: str, argv: str, expected: str):
    """One row: ``module.main((base + argv).split())`` must fail saying ``expected``."""
    return pytest.param(module, base + argv, expected, id=f"{module} {argv}")


CASES = [
    # train.py: adapter and loss flags
    case("train", TRAIN, "--method adalora", "--method: unknown value 'adalora'"),
    case("train", TRAIN, "--lora_dropout 1.5", "--lora_dropout must be in [0, 1), got 1.5"),
    case("train", TRAIN, "--trainable nope_proj", "--trainable: no linear layer named ['nope_proj']"),
    case("train", TRAIN, "--method mtlora --enable_block_adapter --block_adapter_type ffnn",
         "--block_adapter_type: unknown value 'ffnn'"),
    case("train", TRAIN, "--method lora --enable_block_adapter", "--enable_block_adapter is supported for hydralora"),
    case("train", TRAIN, "--method hydralora --enable_fine_grained_routing", "--enable_fine_grained_routing needs exactly one of --routing_group_size and --routing_groups"),
    case("train", TRAIN, "--method hydralora --lora_nums 1 --enable_fine_grained_routing --routing_group_size 16",
         "--enable_fine_grained_routing needs a router, so --lora_nums >= 2"),
    case("train", TRAIN, "--method lora --enable_blc", "--enable_blc balances a token router"),
    case("train", TRAIN, "--method lora --enable_spectral_reg", "--enable_spectral_reg needs expert up-projections"),
    case("train", TRAIN, "--spectral_reg_lambda -1", "--spectral_reg_lambda must be >= 0, got -1"),
    case("train", TRAIN, "--spectral_reg_form paper", "--spectral_reg_form: expected one of reference, singular_basis"),
    # train.py: training flags
    case("train", TRAIN, "--learning_rate -1", "--learning_rate must be > 0, got -1"),
    case("train", TRAIN, "--per_device_train_batch_size 0", "--per_device_train_batch_size must be >= 1, got 0"),
    case("train", TRAIN, "--gradient_accumulation_steps 0", "--gradient_accumulation_steps must be >= 1, got 0"),
    case("train", TRAIN, "--num_train_epochs 0", "--num_train_epochs must be > 0 (or --max_steps > 0)"),
    case("train", TRAIN, "--save_steps 0", "--save_steps must be > 0"),
    case("train", TRAIN, "--seed -1", "--seed must be in [0, 2**32)"),
    case("train", TRAIN, "--warmup_steps -1", "warmup_steps >= 0"),
    case("train", TRAIN, "--max_seq_length 4", "--max_seq_length must be at least 8, got 4"),
    case("train", TRAIN, "--deepspeed {missing}", "--deepspeed {missing}: no such file"),
    # train.py: files and folders
    case("train", TRAIN, "--model_name_or_path {missing}", "--model_name_or_path {missing}: no such file or folder"),
    case("train", TRAIN, "--model_name_or_path {config_only}", "--model_name_or_path {config_only}: holds only "
         "config.json; training needs the weights"),
    case("train", TRAIN, "--data_path {missing}", "--data_path {missing}: no such file"),
    case("train", TRAIN, "--data_path {latin1}", "{latin1}:2: not UTF-8 text"),
    case("train", TRAIN, "--data_path {not_objects}", "{not_objects}:1: expected a JSON object"),
    case("train", TRAIN, "--data_path {bad_json_line}", "{bad_json_line}:2: invalid JSON"),
    case("train", TRAIN, "--resume_from_checkpoint {missing}", "--resume_from_checkpoint {missing}: no such folder"),
    case("train", TRAIN, "--resume_from_checkpoint {truncated_trainer_checkpoint}",
         "--resume_from_checkpoint {truncated_trainer_checkpoint}: {truncated_trainer_checkpoint}/"
         "adapter_model.safetensors: not a complete safetensors file"),
    case("train", TRAIN, "--output_dir {foreign_run} --resume_from_checkpoint last",
         "--output_dir {foreign_run} holds checkpoint-2 but no readable run_identity.json"),
    case("train", "", "--model_name_or_path {missing} --count_params_only", "--model_name_or_path {missing}: no such file"),
    # evaluators
    case("eval_bbh", EVAL_BBH, "--data_dir {missing}", "--data_dir {missing}: no such folder"),
    case("eval_bbh", EVAL_BBH, "--tasks nope", "--tasks: unknown ['nope']"),
    case("eval_bbh", EVAL_BBH, "--batch_size 0", "--batch_size: expected a positive integer or auto, got 0"),
    case("eval_bbh", EVAL_BBH, "--lora_checkpoint {missing}", "--lora_checkpoint {missing}: expected a folder"),
    case("eval_bbh", EVAL_BBH, "--lora_checkpoint {truncated}", "{truncated}/adapter_model.safetensors: not a "
         "complete safetensors file"),
    case("eval_bbh", EVAL_BBH, "--model_name_or_path {missing}", "--model_name_or_path {missing}: no such file"),
    case("eval_mmlu", EVAL_MMLU, "--data_dir {missing}", "--data_dir {missing}: expected folders dev/ and test/"),
    case("eval_mmlu", EVAL_MMLU, "--num_shots -1", "--num_shots must be >= 0, got -1"),
    case("eval_mmlu", EVAL_MMLU, "--subjects nope", "--subjects: unknown ['nope']"),
    case("eval_mmlu", EVAL_MMLU, "--lora_checkpoint {bad_config}", "{bad_config}/adapter_config.json: not a valid "
         "JSON adapter config"),
    case("eval_heldout", EVAL_HELDOUT, "--eval_file {missing}", "--eval_file {missing}: no such file"),
    case("eval_heldout", EVAL_HELDOUT, "--eval_file {latin1}", "{latin1}:2: not UTF-8 text"),
    case("eval_heldout", EVAL_HELDOUT, "--eval_file {not_objects}", "{not_objects}:1: expected a JSON object"),
    case("eval_heldout", EVAL_HELDOUT, "--limit 0", "--limit must be >= 1, got 0"),
    case("eval_heldout", EVAL_HELDOUT, "--lora_checkpoint {truncated}", "{truncated}/adapter_model.safetensors"),
    case("eval_harness", EVAL_HARNESS, "--mmlu_dir {missing}", "--mmlu_dir {missing}: no such folder"),
    case("eval_harness", EVAL_HARNESS, "--num_fewshot -1", "--num_fewshot must be >= 0, got -1"),
    case("eval_harness", EVAL_HARNESS, "--subjects nope", "--subjects: unknown ['nope']"),
    case("eval_harness", EVAL_HARNESS, "--lora_checkpoint {missing}", "--lora_checkpoint {missing}: expected a folder"),
    # baselines and generation
    case("merge_loras", MERGE, "--lora_checkpoints {missing}", "--lora_checkpoints {missing}: expected a folder"),
    case("merge_loras", MERGE, "--lora_checkpoints {lora} --density 1.5", "--density must be in (0, 1] for ties"),
    case("merge_loras", MERGE, "--lora_checkpoints {lora},{hydralora}", "--lora_checkpoints {hydralora}: expected a "
         "--method lora adapter, got hydralora"),
    case("merge_loras", MERGE, "--lora_checkpoints {lora},{truncated}", "{truncated}/adapter_model.safetensors: not a "
         "complete safetensors file"),
    case("merge_loras", MERGE, "--lora_checkpoints {lora} --model_name_or_path {config_only}",
         "--model_name_or_path {config_only}: holds only config.json"),
    case("generate", "", "--model_name_or_path {model} --prompts_file {missing}", "--prompts_file {missing}: no such file"),
    case("generate", "", "--model_name_or_path {model} --prompts_file {latin1}", "{latin1}:2: not UTF-8 text"),
    case("generate", "", "--model_name_or_path {model} --prompts_file {bad_json_line}", "{bad_json_line}:2: invalid JSON"),
    case("generate", "", "--model_name_or_path {model} --prompt hi --lora_checkpoint {bad_config}",
         "{bad_config}/adapter_config.json: not a valid JSON adapter config"),
    case("generate", "", "--model_name_or_path {model} --prompt hi --max_new_tokens 0", "--max_new_tokens must be >= 1"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {missing} --fewshot_path {records}",
         "--lora_checkpoints {missing}: expected a folder"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {lora},{truncated} --fewshot_path {records}",
         "{truncated}/adapter_model.safetensors: not a complete safetensors file"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {lora} --fewshot_path {records} --budget 0",
         "--budget must be >= 1, got 0"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {lora} --fewshot_path {missing}",
         "--fewshot_path {missing}: no such file"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {lora} --fewshot_path {latin1}", "{latin1}:2: not UTF-8"),
    case("compose_lorahub", LORAHUB, "--lora_checkpoints {lora} --fewshot_from_bbh {missing}", "{missing}: no such "
         "folder"),
    # data preparation
    case("data.prepare", "", "flan --source {not_objects} --output_dir {out}", "{not_objects}, record 1: expected a JSON "
         "object"),
    case("data.prepare", "", "flan --source {latin1} --output_dir {out}", "{latin1}:2: not UTF-8 text"),
    case("data.prepare", "", "flan --source {missing} --output_dir {out}", "--source {missing}: no such file"),
    case("data.prepare", "", "flan --source {records} --num_examples 0 --output_dir {out}", "--num_examples must be >= 1"),
    case("data.prepare", "", "dolly --source {records} --output_dir {out}", "{records}:1: missing field(s) ['context', "
         "'response', 'category']"),
    case("data.prepare", "", "bigbench --sdist {corrupt_sdist} --num_tasks 2 --output_dir {out}",
         "--sdist {corrupt_sdist}: not a complete .tar.gz"),
    case("data.prepare", "", "bbh --source {missing} --output_dir {out}", "--source {missing}: not a folder"),
    # tables and analysis
    case("tables.run_table", "", "--table main_ablation --rows nope", "--rows: unknown ['nope']"),
    case("tables.run_table", "", "--table main_ablation --model_name_or_path {missing} --results_dir {out}",
         "--model_name_or_path {missing}"),
    case("analysis.routing_entropy", ANALYSIS, "--checkpoints 0={hydralora} 1={missing}",
         "--checkpoints {missing}: expected a folder"),
    case("analysis.routing_entropy", ANALYSIS, "--checkpoints 0={lora}", "--checkpoints {lora}: --method lora"),
    case("analysis.routing_entropy", ANALYSIS, "--checkpoints 0={hydralora} --data_path {latin1}",
         "{latin1}:2: not UTF-8 text"),
    case("analysis.routing_entropy", ANALYSIS, "--checkpoints ={hydralora}", "--checkpoints: expected label=path"),
    case("analysis.spectral_alignment", "", "--checkpoints a={truncated} --output_dir {out}",
         "{truncated}/adapter_model.safetensors: not a complete safetensors file"),
    case("analysis.routing_patterns", ANALYSIS, "--checkpoint {hydralora} --layers 7", "--layers [7]: not adapted"),
    case("analysis.routing_patterns", ANALYSIS, "--checkpoint {missing}", "--checkpoint {missing}: expected a folder"),
    case("analysis.gradient_conflict", ANALYSIS, "--checkpoints a={hydralora} b={missing}",
         "--checkpoints {missing}: expected a folder"),
    case("analysis.gradient_conflict", ANALYSIS, "--data_path {missing}", "--data_path {missing}: no such file"),
    case("analysis.run_figures", "", "--results_dir {missing}", "--results_dir {missing}: no main_ablation.json"),
]


class Inputs:
    """Good and bad inputs, each written on first use."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model = root, str(model_dir)
        self.vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def __getitem__(self, name: str) -> str:  # for str.format_map
        return str(getattr(self, name))

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def missing(self) -> Path:
        return self.root / "missing"

    @cached_property
    def records(self) -> Path:
        return write_multitask_records(self.root / "train.jsonl")

    @cached_property
    def latin1(self) -> Path:
        return self._write("latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')

    @cached_property
    def not_objects(self) -> Path:
        return self._write("not_objects.json", b"[1, 2]")

    @cached_property
    def bad_json_line(self) -> Path:
        return self._write("bad_line.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n')

    @cached_property
    def corrupt_sdist(self) -> Path:
        return self._write("bigbench-1.0.0.tar.gz", b"\x1f\x8b not really gzip")

    @cached_property
    def lora(self) -> str:
        return write_lora_checkpoint(self.root / "lora", 0, vocab_size=self.vocab_size)

    @cached_property
    def hydralora(self) -> str:
        return random_adapter_checkpoint(self.root / "hydralora", adapter_config("hydralora"), vocab_size=self.vocab_size)

    @cached_property
    def truncated(self) -> str:
        folder = write_lora_checkpoint(self.root / "truncated", 1, vocab_size=self.vocab_size)
        _truncate(Path(folder) / "adapter_model.safetensors")
        return folder

    @cached_property
    def bad_config(self) -> str:
        folder = write_lora_checkpoint(self.root / "bad_config", 2, vocab_size=self.vocab_size)
        (Path(folder) / "adapter_config.json").write_text("{lora_rank: 4")
        return folder

    @cached_property
    def truncated_trainer_checkpoint(self) -> Path:
        return Path(self.truncated)  # a trainer checkpoint starts with its adapter files

    @cached_property
    def foreign_run(self) -> Path:
        """An output folder with a checkpoint but no run identity (another tool's, or an older run's)."""
        folder = self.root / "foreign"
        shutil.copytree(self.lora, folder / "checkpoint-2")
        return folder

    @cached_property
    def config_only(self) -> Path:
        (self.root / "config_only").mkdir()
        shutil.copy(Path(self.model) / "config.json", self.root / "config_only")
        return self.root / "config_only"

    @cached_property
    def bbh(self) -> Path:
        return write_bbh_folder(self.root / "bbh")

    @cached_property
    def mmlu(self) -> Path:
        return write_mmlu_folder(self.root / "mmlu")

    def _write(self, name: str, data: bytes) -> Path:
        (self.root / name).write_bytes(data)
        return self.root / name


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def run_entry_point(module: str, argv: list[str], capsys) -> str:
    """Run ``module.main(argv)``; returns everything it said, failing the test if it accepted the input."""
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    assert code not in (0, None), f"{module} accepted {argv}"
    return (code if isinstance(code, str) else "") + captured.err + captured.out


@pytest.mark.parametrize("module, argv, expected", CASES)
def test_bad_input_fails_before_loading_naming_the_flag_or_file(module, argv, expected, tiny_model_dir, tmp_path,
                                                                no_model_loading, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by mistake stays in the test's folder
    inputs = Inputs(tmp_path, tiny_model_dir)
    expected = expected.format_map(inputs)
    argv = argv.format_map(inputs).split()
    flags = [arg.lstrip("-") for arg in argv if arg.startswith("--")]
    assert "--" in expected or str(tmp_path) in expected or any(flag in expected for flag in flags), \
        "the row must name a flag or file"
    said = run_entry_point(module, argv, capsys)
    assert expected in said
    assert not inputs.out.exists() or module == "tables.run_table", "wrote outputs before failing"
