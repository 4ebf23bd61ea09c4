"""README's claims table is generated from the tables' JSON."""

import json

import pytest

from mtlora.experiments import claims


BBH = {"bbh": {"difference": 0.012, "low": 0.004, "high": 0.02, "seeds": 3, "items": 6430, "verdict": "supported"}}


def versus(key="baseline", label="HydraLoRA", metrics=BBH, claim=True):
    return {"key": key, "label": label, "claim": claim, "metrics": metrics}


def table():
    return {"title": "Table 2: ablation", "scale": "small", "gpu_minutes": 12.0, "verdict_rule": "rule", "rows": [
        {"key": "base", "label": "base", "track": "t", "paper": {}, "versus": versus()},
        {"key": "baseline", "label": "HydraLoRA", "track": "t", "paper": {"bbh": [35.5, 1.7]}},
        {"key": "mtlora", "label": "mtLoRA", "track": "t", "paper": {"bbh": [38.5, 0.3]}, "versus": versus()}]}


def test_one_claim_per_row_and_metric_with_the_paper_s_difference():
    markdown = claims.claims_markdown([table()])
    lines = [line for line in markdown.splitlines() if line.startswith("| Table 2")]
    assert lines == ["| Table 2 | mtLoRA vs HydraLoRA | BBH (paper protocol) | +3.0 (BBH) | +1.2 [+0.4, +2.0] | "
                     "3 x 6,430 items | **supported** |"]  # the base model's row is no claim
    assert "Table 2 (small scale): 12 GPU-minutes" in markdown
    plain = table()  # Tables 3 and 4 give the paper's numbers without a std
    plain["rows"][1]["paper"], plain["rows"][2]["paper"] = {"bbh": 35.5}, {"bbh": 37.0}
    assert "| +1.5 (BBH) |" in claims.claims_markdown([plain])


def test_a_row_is_claimed_against_the_row_it_names_per_track():
    """Table S3's collapse claim: the single LoRA against naive averaging, at each task count (its own track);
    naive averaging against HydraLoRA is a diagnostic, not a claim."""
    rows = [{"key": key, "label": label, "track": track, "paper": {}, **extra}
            for track in ("tasks5", "tasks25")
            for key, label, extra in (("lora", "single LoRA", {"versus": versus("naive_average", "naive averaging")}),
                                      ("naive_average", "naive averaging", {"versus": versus(claim=False)}),
                                      ("baseline", "HydraLoRA", {}))]
    markdown = claims.claims_markdown([{**table(), "title": "Task-count scaling: held-out", "rows": rows}])
    claimed = [line.split(" | ")[1] for line in markdown.splitlines() if line.startswith("| Task-count")]
    assert claimed == ["single LoRA vs naive averaging (tasks5)", "single LoRA vs naive averaging (tasks25)"]


def test_the_readme_section_between_the_markers_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.BEGIN}\nold\n{claims.END}\noutro\n")
    source = tmp_path / "t.json"
    source.write_text(json.dumps(table()))
    claims.main([str(source), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "**supported**" in text
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- claims:begin -->"):
        claims.main([str(source), "--readme", str(readme)])
