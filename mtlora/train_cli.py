"""train.py's command line: every flag declared once, in its dataclass (model, data, adapter, auxiliary losses,
training), parsed by HfArgumentParser; only the project's own errors become one-line messages."""


import sys

from transformers import HfArgumentParser

from mtlora.arguments import AdapterTrainingArguments, DataArguments, ModelArguments
from mtlora.config import AdapterConfig
from mtlora.errors import UsageError
from mtlora.losses import AuxiliaryLosses
from mtlora.training import count_only, run_training


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """(model, data, adapter, auxiliary-loss, training) arguments: every flag is declared once, in its dataclass."""
    parser = HfArgumentParser((ModelArguments, DataArguments, AdapterConfig, AuxiliaryLosses, AdapterTrainingArguments))
    try:  # TrainingArguments checks its own flags while parsing
        return parser.parse_args_into_dataclasses(args=argv)
    except (UsageError, ValueError) as err:
        sys.exit(f"error: {err}")


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, adapter_config, aux_losses, training_args = parse_arguments(argv)
    try:
        if model_args.count_params_only:
            adapter_config.validate()
            count_only(model_args, adapter_config)
        else:
            run_training(model_args, data_args, adapter_config, aux_losses, training_args)
    except UsageError as err:
        sys.exit(f"error: {err}")

