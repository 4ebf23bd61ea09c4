"""The claims table: every trained row against the row it is compared with (the table's baseline unless the registry
names another, ``Row.versus``), per metric, with the paper's difference,
ours (paired bootstrap, 95%), the seeds it rests on and the verdict, read from tables' JSON; never typed by hand.

    python -m mtlora.experiments.claims results/small_seeds/main_ablation.json --readme README.md

With --readme, the table replaces what stands between ``<!-- claims:begin -->`` and ``<!-- claims:end -->``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mtlora.experiments.results import METRICS

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
PAPER_COLUMN = {"bbh": "bbh", "mmlu": "mmlu", "mmlu_loglik": "mmlu", "mmlu_cloze": "mmlu"}  # the paper's benchmark
LABELS = {m.name: m.label for m in METRICS}


def paper_difference(row: dict, reference: dict, metric: str) -> str:
    column = PAPER_COLUMN.get(metric)
    if column is None or column not in row["paper"] or column not in reference["paper"]:
        return "—"
    return f"{paper_mean(row['paper'][column]) - paper_mean(reference['paper'][column]):+.1f} ({column.upper()})"


def paper_mean(value) -> float:
    """A paper number: (mean, std) where the paper gives a std, else the number."""
    return value[0] if isinstance(value, (list, tuple)) else value


def claim_rows(table: dict) -> list[str]:
    """One Markdown row per (row, metric) that has a paired interval against the row it is compared with (the
    baseline, or the one it names), unless the comparison is a diagnostic (no paper claim); the track is named where
    the table has several."""
    rows = {(r["track"], r["key"]): r for r in table["rows"]}
    several_tracks = len({r["track"] for r in table["rows"]}) > 1
    lines = []
    for row in table["rows"]:
        versus = row.get("versus")
        if not versus or not versus["claim"] or row["key"] == "base":
            continue
        reference = rows[(row["track"], versus["key"])]
        where = f" ({row['track']})" if several_tracks else ""
        for metric, result in versus["metrics"].items():
            interval = (f"{100 * result['difference']:+.1f} [{100 * result['low']:+.1f}, "
                        f"{100 * result['high']:+.1f}]")
            lines.append(f"| {table['title'].split(':')[0]} | {row['label']} vs {reference['label']}{where} | "
                         f"{LABELS[metric]} | {paper_difference(row, reference, metric)} | {interval} | "
                         f"{result['seeds']} x {result['items']:,} items | **{result['verdict']}** |")
    return lines


def claims_markdown(tables: list[dict]) -> str:
    header = ["| table | claim | metric | paper's difference | ours, points [95% CI] | seeds x items | verdict |",
              "|---|---|---|---|---|---|---|"]
    minutes = "; ".join(f"{t['title'].split(':')[0]} ({t['scale']} scale): {t['gpu_minutes']:.0f} GPU-minutes"
                        for t in tables)
    rule = tables[0]["verdict_rule"] if tables else ""
    return "\n".join(header + [line for t in tables for line in claim_rows(t)]) + f"\n\nVerdict rule: {rule}. {minutes}."


def replace_between_markers(text: str, block: str, where: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: --readme {where}: no {BEGIN} ... {END} section to replace")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="tables' JSON written by tables/run_table.py")
    parser.add_argument("--readme", default=None, help="write the table into this file between the markers")
    args = parser.parse_args(argv)
    block = claims_markdown([json.loads(Path(path).read_text()) for path in args.tables])
    if args.readme is None:
        print(block)
        return
    readme = Path(args.readme)
    readme.write_text(replace_between_markers(readme.read_text(), block, args.readme))
    print(f"{args.readme}: claims table written ({block.count(chr(10)) - 3} claims)")


if __name__ == "__main__":
    main()
