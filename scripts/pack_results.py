"""Pack a table run's results for moving or committing: summaries, logs and per-item scores, no weights.

    python scripts/pack_results.py outputs/tables results_small.tar.gz

Every per-item file under ``runs/*/eval/`` (the ``predictions`` / ``samples`` lists) keeps each item's scores and
short labels (numbers, booleans, strings up to 32 characters) and drops the long texts (prompts, generations,
lm-eval's documents); that is all the tables and their paired intervals read. Adapter weights, checkpoints,
tokenizer files, lm-eval's task configs, locks and progress files are left out. Unpack into a results folder and run
``tables/run_table.py --assemble_only`` to tabulate.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

ITEM_LISTS = ("predictions", "samples")
LEFT_OUT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".lock", ".jinja")
LEFT_OUT_NAMES = {"progress.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
LEFT_OUT_FOLDERS = {"lm_eval_tasks"}  # lm-eval's task configs as the harness wrapper wrote them for the run
GROUP_KEYS = {"task_type"}  # the label that groups items into tasks (mtlora.experiments.results): kept whatever its length


def compact_item(item: dict) -> dict:
    return {key: value for key, value in item.items()
            if key in GROUP_KEYS or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 32)}


def packed_bytes(path: Path, relative: Path) -> bytes | None:
    """The file's content as packed (None: left out); ``relative``: its path inside the results folder."""
    if path.suffix in LEFT_OUT_SUFFIXES or path.name in LEFT_OUT_NAMES or any(
            part.startswith("checkpoint-") or part in LEFT_OUT_FOLDERS for part in relative.parts):
        return None
    if path.suffix == ".json" and "eval" in relative.parts:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ITEM_LISTS:
            if isinstance(data, dict) and isinstance(data.get(key), list):
                data[key] = [compact_item(item) for item in data[key]]
        return (json.dumps(data, indent=1) + "\n").encode()
    return path.read_bytes()


def pack(source: Path, archive: Path) -> int:
    """Pack ``source`` into ``archive``; the number of files packed. A live run may delete files (a tuned merge's
    grid folders) while it is packed: such a file is left out with a note."""
    count = 0
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source)
            try:
                content = packed_bytes(path, relative)
            except FileNotFoundError:
                print(f"note: {path} was deleted while packing; left out", file=sys.stderr)
                continue
            if content is None:
                continue
            info = tarfile.TarInfo(str(relative))
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
            count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"packed {pack(Path(sys.argv[1]), Path(sys.argv[2]))} files into {sys.argv[2]}")
