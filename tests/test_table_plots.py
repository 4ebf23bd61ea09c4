"""Accuracy vs routing groups and vs task count: the points (x, mean, std) come from the tables' JSON."""

import json

import pytest

from analysis import table_plots


def metric(mean, std):
    return {"mean": mean, "std": std, "values": [mean]}


def test_routing_granularity_points_follow_the_registry_s_groups(tmp_path):
    table = {"table": "routing_granularity", "title": "Table 3", "seeds": [42, 43, 44], "rows": [
        {"key": "base", "label": "base", "track": "bigbench", "heldout": metric(0.1, None)},
        {"key": "baseline", "label": "G = 1", "track": "bigbench", "heldout": metric(0.40, 0.01)},
        {"key": "component_g8", "label": "G = 8", "track": "bigbench", "heldout": metric(0.42, 0.02)},
        {"key": "component_g2", "label": "G = 2", "track": "bigbench", "heldout": metric(0.41, None)}]}
    series = table_plots.points(table, "heldout", lambda r: table_plots.groups_of("routing_granularity", r["key"]),
                                lambda r: r["track"])
    assert series == {"bigbench": [(1, 40.0, 1.0), (2, 41.0, 0.0), (8, 42.0, 2.0)]}  # the base row has no G
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert table_plots.table_plot(path, tmp_path / "out").is_file()


def test_task_scaling_points_are_per_row_over_task_counts(tmp_path):
    table = {"table": "task_scaling", "title": "scaling", "seeds": [1], "rows": [
        {"key": "mtlora", "label": "mtLoRA", "track": f"tasks{n}", "bbh": metric(v, 0.0)}
        for n, v in ((25, 0.3), (5, 0.2))]}
    assert table_plots.points(table, "bbh", lambda r: table_plots.task_count_of(r["track"]), lambda r: r["label"]) == {
        "mtLoRA": [(5, 20.0, 0.0), (25, 30.0, 0.0)]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**table, "table": "main_ablation"}))
    with pytest.raises(SystemExit, match="expected one of routing_granularity"):
        table_plots.table_plot(path, tmp_path / "out")


def test_main_results_plot_puts_each_row_s_held_out_against_the_benchmark(tmp_path):
    table = {"table": "main_results", "title": "Table 5: rows", "seeds": [42, 43], "rows": [
        {"key": "base", "label": "base model", "track": "bigbench", "heldout": metric(0.0, None), "bbh": metric(0.37, None)},
        {"key": "lora", "label": "LoRA", "track": "bigbench", "heldout": metric(0.36, 0.003), "bbh": metric(0.29, 0.004)},
        {"key": "mole", "label": "MoLE", "track": "bigbench", "heldout": metric(0.0, 0.0)}]}  # no BBH yet: left out
    rows = table_plots.row_points(table, "bbh")
    assert [label for label, _, _ in rows] == ["base model", "LoRA"]
    assert [x + y for _, x, y in rows] == [pytest.approx((0.0, 0.0, 37.0, 0.0)), pytest.approx((36.0, 0.3, 29.0, 0.4))]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert table_plots.table_plot(path, tmp_path / "out", "bbh").name == "main_results_bbh.png"
    with pytest.raises(SystemExit, match="--metric heldout: the main-results plot draws a benchmark against held-out"):
        table_plots.table_plot(path, tmp_path / "out", "heldout")


def _trained_run(results_dir, name, heldout=None):
    run = results_dir / "small" / "runs" / "bigbench" / name
    run.mkdir(parents=True)
    (run / "train_summary.json").write_text("{}")
    if heldout is not None:
        (run / "eval" / "heldout").mkdir(parents=True)
        (run / "eval" / "heldout" / "summary.json").write_text(json.dumps({"average": {"exact": heldout}}))


def test_retrain_noise_compares_runs_trained_in_both_folders(tmp_path):
    from analysis import retrain_noise

    _trained_run(tmp_path / "a", "baseline-s42-x", heldout=0.30)
    _trained_run(tmp_path / "b", "baseline-s42-x", heldout=0.32)
    _trained_run(tmp_path / "a", "only-here-s42-y", heldout=0.5)  # trained once: nothing to compare
    _trained_run(tmp_path / "b", "mtlora-s42-z")
    _trained_run(tmp_path / "a", "mtlora-s42-z", heldout=0.4)  # evaluated in one copy only
    summary = retrain_noise.main(["--kept", str(tmp_path / "a"), "--other", str(tmp_path / "b"),
                                  "--output", str(tmp_path / "out" / "noise")])
    assert summary["heldout"]["pairs"] == 1 and summary["heldout"]["max_abs"] == pytest.approx(2.0)
    rows = json.loads((tmp_path / "out" / "noise.json").read_text())["runs"]
    assert [(r["run"].split("/")[-1], r["a"], r["b"], r["metric"]) for r in rows] == [("baseline-s42-x", "a", "b", "heldout")]
    assert rows[0]["difference"] == pytest.approx(2.0)
    _trained_run(tmp_path / "third", "baseline-s42-x", heldout=0.25)  # a third training: two more pairs (a-c, b-c)
    summary = retrain_noise.main(["--kept", str(tmp_path / "a"), "--other", str(tmp_path / "b"), str(tmp_path / "third"),
                                  "--output", str(tmp_path / "out" / "noise")])
    assert summary["heldout"]["pairs"] == 3 and summary["heldout"]["max_abs"] == pytest.approx(7.0)
    assert summary["heldout"]["mean_abs"] == pytest.approx((2 + 5 + 7) / 3)
    _trained_run(tmp_path / "c", "other-s1-w", heldout=0.1)
    with pytest.raises(ValueError, match="share no trained run"):
        retrain_noise.main(["--kept", str(tmp_path / "a"), "--other", str(tmp_path / "c"), "--output", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--other .* no trained run"):
        retrain_noise.main(["--kept", str(tmp_path / "a"), "--other", str(tmp_path / "a" / "small"),
                            "--output", str(tmp_path / "x")])


def _bbh_run(results_dir, track, name, answers):
    """A run folder with one BBH task file: (generation or None when packing dropped a long one, lenient)."""
    tasks = results_dir / "small" / "runs" / track / name / "eval" / "bbh" / "tasks"
    tasks.mkdir(parents=True)
    items = [{"lenient": ok, **({} if text is None else {"generation": text})} for text, ok in answers]
    (tasks / "navigate.json").write_text(json.dumps({"predictions": items}))


def test_empty_answers_counts_blank_generations_per_row_and_correlates_them_with_bbh(tmp_path):
    from analysis import empty_answers

    _bbh_run(tmp_path, "tasks15", "mtlora-s42-0a1b2c3d", [("", False), (" \n", False), (" No", True), (None, False)])
    _bbh_run(tmp_path, "tasks15", "mtlora-s43-0a1b2c3e", [("", False), (" Yes", True), (" No", True), (None, True)])
    _bbh_run(tmp_path, "tasks5", "base-3ee1cd5e", [(" No", True)] * 4)
    heldout = tmp_path / "small" / "runs" / "tasks15" / "mtlora-s42-0a1b2c3d" / "eval" / "heldout"
    heldout.mkdir(parents=True)
    (heldout / "predictions.json").write_text(json.dumps({"predictions": [{"task_type": "t", "generation": "No"},
                                                                           {"task_type": "t", "generation": " "}]}))
    (tmp_path / "small" / "runs" / "tasks5" / "no-bbh-s1-abcdef12").mkdir()  # evaluated on other suites only
    result = empty_answers.main(["--results_dir", str(tmp_path), "--output", str(tmp_path / "out" / "empty")])
    assert [(r["track"], r["row"], r["seeds"]) for r in result["rows"]] == [
        ("tasks5", "base", [None]), ("tasks15", "mtlora", [42, 43])]  # tasks5 sorts before tasks15
    mtlora = result["rows"][1]
    assert mtlora["empty"][0] == pytest.approx(37.5) and mtlora["bbh"][0] == pytest.approx(50.0)  # (2 + 1) / 8 blank
    assert mtlora["empty_heldout"] == (50.0, None)  # one seed has held-out answers, one of its two is blank
    assert result["rows"][0]["empty_heldout"] == (None, None)
    # (blank %, BBH %) per run: (0, 100), (50, 25), (25, 75): r = -1875 / sqrt(1250 * 2916.7)
    assert result["correlation"]["all"] == {"runs": 3, "r": pytest.approx(-0.982, abs=1e-3)}
    assert result["correlation"]["answering"] == result["correlation"]["all"]
    _bbh_run(tmp_path, "bigbench", "merge-s42-0a1b2c3f", [("", False)] * 4)  # a collapsed model: every answer empty
    result = empty_answers.main(["--results_dir", str(tmp_path), "--output", str(tmp_path / "out" / "empty")])
    assert result["correlation"]["all"]["runs"] == 4 and result["correlation"]["all"]["r"] != pytest.approx(-0.982, abs=1e-3)
    assert result["correlation"]["answering"] == {"runs": 3, "r": pytest.approx(-0.982, abs=1e-3)}
    assert "-0.98 over 3 runs that answer at least one" in (tmp_path / "out" / "empty.md").read_text()
    assert (tmp_path / "out" / "empty.md").read_text().startswith("| track | row | runs | empty BBH answers % |")
    with pytest.raises(ValueError, match="--results_dir .* no run with BBH per-task files"):
        empty_answers.main(["--results_dir", str(tmp_path / "out"), "--output", str(tmp_path / "x")])
