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

from mtlora.evaluation.distributed import release
from mtlora.train_cli import main

if __name__ == "__main__":
    try:
        main()
    finally:
        release()
