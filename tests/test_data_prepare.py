"""data/prepare.py: bigbench from a fake sdist tarball, bbh/mmlu/flan/dolly from local sources, errors."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from data import prepare
from data.bigbench import BBH_SOURCE_TASKS, example_record
from tests.helpers import write_bbh_folder, write_mmlu_folder
from mtlora.evaluation.bbh import load_bbh_task
from mtlora.evaluation.mmlu import load_mmlu_csv

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def generative(task: str, count: int) -> dict:
    return {"name": task, "examples": [{"input": f"{task} question {i}", "target": f"answer {i}"} for i in range(count)]}


def multiple_choice(count: int) -> dict:
    return {"name": "mc", "task_prefix": "Choose well.", "examples": [
        {"input": f"Pick {i}", "target_scores": {"red": 0, "blue": 1, "green": 0}} for i in range(count)]}


def write_sdist(path, tasks: dict[str, dict]):
    """A .tar.gz with the sdist layout: <ROOT>/<folder>/task.json for each entry."""
    with tarfile.open(path, "w:gz") as archive:
        for folder, content in tasks.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"{ROOT}/{folder}/task.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path):
    duplicated = generative("dup", 12)
    duplicated["examples"] += duplicated["examples"][:5]
    return write_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {
        "alpha": generative("alpha", 30), "beta": generative("beta", 12), "mc": multiple_choice(15), "dup": duplicated,
        "numeric": {"examples": [{"input": "1+1", "target": 2}] * 20},  # no usable (string) target
        "navigate": generative("navigate", 40),  # a BBH source task
        "logical_deduction/three_objects": generative("ld3", 40),  # subtask of a BBH source task
        "subtasks_only/part": generative("part", 40),  # no top-level task.json
    })


def run_bigbench(sdist, out, *extra):
    return prepare.main(["bigbench", "--sdist", str(sdist), "--output_dir", str(out), "--min_examples", "10",
                         "--eval_per_task", "4", *extra])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bigbench_excludes_bbh_sources_caps_and_splits(sdist, tmp_path):
    out = tmp_path / "bb"
    assert run_bigbench(sdist, out, "--num_tasks", "4", "--max_per_task", "10") == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert sorted(tasks["tasks"]) == ["alpha", "beta", "dup", "mc"] and tasks["num_eligible_tasks"] == 4
    assert {"navigate", "logical_deduction"} <= set(tasks["excluded_bbh_source_tasks"])
    train, held_out = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert {r["task_type"] for r in train} == {"alpha", "beta", "dup", "mc"}
    counts = {t: sum(r["task_type"] == t for r in train) for t in tasks["tasks"]}
    assert counts == {"alpha": 10, "beta": 8, "dup": 8, "mc": 10}  # cap 10 after 4 held out; dup has 12 distinct
    assert all(sum(r["task_type"] == t for r in held_out) == 4 for t in counts)
    for task in counts:
        train_texts = {r["instruction"] for r in train if r["task_type"] == task}
        assert not train_texts & {r["instruction"] for r in held_out if r["task_type"] == task}
    assert set(train[0]) == {"instruction", "input", "output", "task_type"}
    assert all(set(r) == {"instruction", "input", "output", "task_type", "references"} for r in held_out)


def test_bigbench_multiple_choice_record_lists_options():
    record = example_record("mc", multiple_choice(1)["examples"][0], "Choose well.")
    assert record["instruction"] == "Choose well.\n\nPick 0\nOptions:\n- red\n- blue\n- green"
    assert (record["input"], record["output"]) == ("", "blue")
    assert example_record("x", {"input": "q", "target_scores": {"a": 1, "b": 1}}) is None  # tie
    assert example_record("x", {"input": "q", "target": ["one", "uno"]})["references"] == ["one", "uno"]


def test_bigbench_is_deterministic_for_a_seed(sdist, tmp_path):
    for name in ("a", "b"):
        assert run_bigbench(sdist, tmp_path / name, "--num_tasks", "2", "--seed", "3") == 0
    for file in ("train.jsonl", "eval.jsonl", "tasks.json"):
        assert (tmp_path / "a" / file).read_text() == (tmp_path / "b" / file).read_text()


def test_bigbench_explicit_tasks_and_errors(sdist, tmp_path, capsys):
    assert run_bigbench(sdist, tmp_path / "x", "--tasks", "mc", "alpha") == 0
    assert sorted(json.loads((tmp_path / "x" / "tasks.json").read_text())["tasks"]) == ["alpha", "mc"]
    assert run_bigbench(sdist, tmp_path / "y", "--tasks", "navigate") == 2
    assert "BBH source" in capsys.readouterr().err
    assert run_bigbench(sdist, tmp_path / "y", "--tasks", "numeric") == 2
    assert "eligible: alpha, beta, dup, mc" in capsys.readouterr().err
    assert run_bigbench(sdist, tmp_path / "y", "--num_tasks", "9") == 2
    assert "--num_tasks" in capsys.readouterr().err
    assert run_bigbench(tmp_path / "missing.tar.gz", tmp_path / "y", "--num_tasks", "1") == 2
    assert "pip download --no-deps bigbench==1.0.0" in capsys.readouterr().err


def test_bbh_source_list_matches_the_23_tasks():
    assert len(BBH_SOURCE_TASKS) == 23


def test_bbh_and_mmlu_from_local_sources_round_trip(tmp_path):
    bbh = write_bbh_folder(tmp_path / "bbh_src")
    assert prepare.main(["bbh", "--source", str(bbh), "--output_dir", str(tmp_path / "bbh")]) == 0
    assert load_bbh_task(tmp_path / "bbh" / "choices.json") == load_bbh_task(bbh / "choices.json")
    assert isinstance(json.loads((tmp_path / "bbh" / "choices.json").read_text()), list)  # normalised to a list
    mmlu = write_mmlu_folder(tmp_path / "mmlu_src")
    assert prepare.main(["mmlu", "--source", str(mmlu), "--output_dir", str(tmp_path / "mmlu")]) == 0
    for split in ("dev", "test"):
        name = f"{split}/anatomy_{split}.csv"
        assert (tmp_path / "mmlu" / name).read_text() == (mmlu / name).read_text()
        assert load_mmlu_csv(tmp_path / "mmlu" / name) == load_mmlu_csv(mmlu / name)


def test_flan_local_maps_fields_and_caps(tmp_path):
    source = tmp_path / "flan.jsonl"
    rows = [{"inputs": f"Q{i}", "targets": f"A{i}", "task_name": "t1" if i % 3 else "t2"} for i in range(30)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "flan"
    assert prepare.main(["flan", "--source", str(source), "--output_dir", str(out), "--num_examples", "12",
                         "--max_per_task", "5"]) == 0
    records = read_jsonl(out / "train.jsonl")
    assert len(records) == 10 and {r["task_type"] for r in records} == {"t1", "t2"}
    assert all(r["instruction"][1:] == r["output"][1:] and r["input"] == "" for r in records)
    assert json.loads((out / "tasks.json").read_text())["tasks"] == {"t1": 5, "t2": 5}


def test_dolly_local_split(tmp_path):
    source = tmp_path / "dolly.jsonl"
    rows = [{"instruction": f"I{i}", "context": "ctx" if i % 2 else "", "response": f"R{i}", "category": "qa"}
            for i in range(40)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a", "b"):
        assert prepare.main(["dolly", "--source", str(source), "--output_dir", str(tmp_path / name),
                             "--val_size", "0.25"]) == 0
    train, validation = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "validation.jsonl")
    assert (len(train), len(validation)) == (30, 10)
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in validation)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    by_instruction = {r["instruction"]: r for r in train + validation}
    assert by_instruction["I3"] == {"instruction": "I3", "input": "ctx", "output": "R3", "task_type": "qa"}


def test_offline_without_source_names_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in ("bbh", "mmlu", "flan", "dolly"):
        assert prepare.main([command, "--output_dir", str(tmp_path / command)]) == 2
        assert "--source PATH" in capsys.readouterr().err


def test_bad_local_source_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "dolly.jsonl"
    bad.write_text(json.dumps({"instruction": "x"}) + "\n")
    assert prepare.main(["dolly", "--source", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    assert "missing field(s)" in capsys.readouterr().err
    assert prepare.main(["bbh", "--source", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "task.json").write_text(json.dumps({"rows": []}))
    assert prepare.main(["bbh", "--source", str(tmp_path / "bbh"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "task.json" in capsys.readouterr().err


def test_a_corrupt_sdist_or_task_file_is_named(sdist, tmp_path, capsys):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(sdist.read_bytes()[: sdist.stat().st_size // 2])  # an interrupted download
    assert run_bigbench(truncated, tmp_path / "o", "--num_tasks", "1") == 2
    assert f"--sdist {truncated}: not a complete .tar.gz" in capsys.readouterr().err
    broken = write_sdist(tmp_path / "broken.tar.gz", {"alpha": generative("alpha", 30)})
    with tarfile.open(broken, "w:gz") as archive:
        for folder, data in (("alpha", b'{"examples": [\n{"input": }'), ("beta", b"[1, 2]")):
            info = tarfile.TarInfo(f"{ROOT}/{folder}/task.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert run_bigbench(broken, tmp_path / "o", "--num_tasks", "1") == 2
    assert f"--sdist {broken}: {ROOT}/alpha/task.json:2: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["flan", "dolly"])
def test_a_source_record_that_is_not_an_object_is_named_by_line(command, tmp_path, capsys):
    source = tmp_path / "source.jsonl"
    good = {"inputs": "q", "targets": "a", "task_name": "t", "instruction": "i", "context": "", "response": "r",
            "category": "c"}
    source.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '"just text"\n')
    assert prepare.main([command, "--source", str(source), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{source}:3: expected a JSON object (a record), got str" in capsys.readouterr().err
    latin1 = json.dumps({**good, "response": "caf\xe9"}, ensure_ascii=False).encode("latin-1")
    source.write_bytes(json.dumps(good).encode() + b"\n" + latin1)
    assert prepare.main([command, "--source", str(source), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{source}:2: not UTF-8 text" in capsys.readouterr().err
    source.write_text(json.dumps({**good, "response": 3, "targets": 3}) + "\n")
    assert prepare.main([command, "--source", str(source), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{source}:1: " in capsys.readouterr().err


def test_dolly_clusters_are_the_paper_s_kmeans_labels(tmp_path, capsys):
    source = tmp_path / "dolly.jsonl"
    topics = {"cooking": "bake bread flour oven yeast dough", "astronomy": "planet orbit star telescope galaxy moon"}
    rows = [{"instruction": f"{words} question {i}", "context": "", "response": f"R{i}", "category": "open_qa"}
            for i in range(20) for words in topics.values()]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a", "b"):
        assert prepare.main(["dolly", "--source", str(source), "--output_dir", str(tmp_path / name),
                             "--num_clusters", "2"]) == 0
    records = read_jsonl(tmp_path / "a" / "train.jsonl") + read_jsonl(tmp_path / "a" / "validation.jsonl")
    by_topic = {topic: {r["task_type"] for r in records if r["instruction"].startswith(words)}
                for topic, words in topics.items()}
    assert all(len(labels) == 1 for labels in by_topic.values()) and by_topic["cooking"] != by_topic["astronomy"]
    assert all(r["category"] == "open_qa" for r in records)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert prepare.main(["dolly", "--source", str(source), "--output_dir", str(tmp_path / "c"),
                         "--num_clusters", "1000"]) == 2
    assert "--num_clusters 1000: expected 2 to 40" in capsys.readouterr().err
