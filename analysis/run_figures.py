"""Make every figure from the small-scale table runs: finds the checkpoints in the tables' JSON.

    python analysis/run_figures.py --results_dir outputs/tables/small [--model_name_or_path DIR]

Fig. 1A compares the block-level run without and with spectral regularisation (strength 0 and the
track's lambda); Fig. 1B/S2 and S4 use the HydraLoRA baseline and full mtLoRA; Fig. S3 compares the
component-level baseline with the block-level adapter.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_dirs(results_dir: Path) -> dict[str, str]:
    """Row key -> run directory of its first seed, from the Table 2 results."""
    path = results_dir / "main_ablation.json"
    if not path.is_file():
        raise SystemExit(f"error: --results_dir {results_dir}: no main_ablation.json; run "
                         "`bash tables/0_main_ablation.sh --scale small` first")
    first = {}
    for run in json.loads(path.read_text())["per_seed"]:
        if run["key"] != "base":
            first.setdefault(run["key"], run["run_dir"])
    return first


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default="outputs/tables/small")
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--data_path", default="data/processed/bigbench25/eval.jsonl")
    parser.add_argument("--samples_per_task", type=int, default=16)
    args, _ = parser.parse_known_args(argv)  # table flags such as --bbh_dir are passed through and ignored
    results_dir = Path(args.results_dir)
    runs = run_dirs(results_dir)
    figures = results_dir / "figures"
    common = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--data_path", args.data_path,
              "--samples_per_task", str(args.samples_per_task), "--batch_size", "16"]
    if args.model_name_or_path:
        common += ["--model_name_or_path", args.model_name_or_path]
    commands = {
        "routing_entropy": ["--checkpoints", f"0.0={runs['block']}", f"1.0={runs['block_spectral']}"] + common,
        "spectral_alignment": ["--checkpoints", f"hydralora={runs['baseline']}", f"mtlora={runs['mtlora']}"],
        "gradient_conflict": ["--checkpoints", f"component={runs['baseline']}", f"block={runs['block']}"] + common,
        "routing_patterns": ["--checkpoint", runs["mtlora"]] + common,
    }
    for name, flags in commands.items():
        command = [sys.executable, "-m", f"analysis.{name}", "--output_dir", str(figures / name)] + flags
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)


if __name__ == "__main__":
    main()
