"""Train multi-task LoRA adapters (LoRA, HydraLoRA, MMoELoRA, mtLoRA) on a Hugging Face causal LM.

Example (the paper's full mtLoRA on Flan-v2 -> BBH):
    python train.py --method mtlora --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --data_path data/processed/flan/train.jsonl --output_dir outputs/mtlora \\
        --lora_rank 16 --lora_nums 16 --enable_block_adapter --block_adapter_type ffn \\
        --enable_fine_grained_routing --routing_group_size 2048 \\
        --enable_spectral_reg --spectral_reg_lambda 1.0 --spectral_reg_steps 500 --enable_blc --bf16

Multi-GPU: `torchrun --nproc_per_node N train.py ...` (or `accelerate launch`). DeepSpeed ZeRO, through a launcher
(`deepspeed --num_gpus N train.py ...` also for one GPU): add `--deepspeed configs/ds_zero2.json` (or ds_zero3.json;
the *_offload.json configs keep optimizer states, and under ZeRO-3 the frozen weights, in CPU memory). The
optimizer and learning-rate schedule always come from this script's flags, never from the DeepSpeed config.
"""

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


if __name__ == "__main__":
    main()
