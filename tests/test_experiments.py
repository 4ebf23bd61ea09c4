"""The experiment registry and the table runner: flags per row, run identity, seeds, statistics, end to end."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlora.experiments import registry, results
from mtlora.experiments.jobs import Job, RunSettings, as_cli
from mtlora.experiments.registry import SCALES, TABLES, Track
from mtlora.experiments.runner import plan_jobs, run_table, task_count_tracks
from mtlora.experiments.statistics import mean_std, paired_bootstrap, verdict
from mtlora.loading import is_saved_model
from tests.helpers import write_multitask_records, write_tiny_model_folder


def _job(table: str, key: str, scale: str = "paper", track: int = 0, seed: int = 42, **settings) -> Job:
    values = dict(model_name_or_path=None, num_gpus=1, results_dir=Path("/tmp/r"), bbh_dir=".", mmlu_dir=".",
                  use_cuda=True)
    values.update(settings)
    row = {r.key: r for r in TABLES[table].rows}[key]
    return Job(RunSettings(**values), SCALES[scale], TABLES[table], SCALES[scale].tracks[track], row, seed)


def test_registry_rows_give_the_paper_flags():
    full = _job("main_ablation", "mtlora").train_flags
    assert full["routing_groups"] == 2 and full["spectral_reg_steps"] == 500 and full["enable_blc"]
    assert _job("main_ablation", "mtlora", track=1).train_flags["spectral_reg_lambda"] == 0.5  # Dolly -> MMLU
    # Table 3 as the paper states it: component level (q_proj, v_proj), g groups; g = 1 is the HydraLoRA baseline
    granularity = [_job("routing_granularity", r.key).train_flags for r in TABLES["routing_granularity"].rows]
    assert granularity[0] == TABLES["main_ablation"].rows[0].flags
    assert [f.get("routing_groups") for f in granularity] == [None, 2, 8, 16, 32]
    assert not any(f.get("enable_block_adapter") for f in granularity)
    assert all(r.flags["enable_block_adapter"] for r in TABLES["routing_granularity_block"].rows)
    assert _job("main_ablation", "baseline").training["gradient_accumulation_steps"] == 2  # 16 x 2 = 32
    assert _job("main_ablation", "baseline", num_gpus=2).training["gradient_accumulation_steps"] == 1
    assert as_cli({"enable_blc": True, "lora_rank": 16, "x": None, "y": False, "t": ["q", "v"]}) == [
        "--enable_blc", "--lora_rank", "16", "--t", "q", "v"]


def test_paper_numbers_are_the_sheet_s():
    ablation = {r.key: r.paper for r in TABLES["main_ablation"].rows}
    assert ablation["baseline"]["bbh"] == (35.5, 1.7) and ablation["mtlora"]["mmlu"] == (44.5, 0.3)
    assert [ablation[k]["time"] for k in ("baseline", "block", "block_spectral", "block_fgr", "mtlora")] == [
        1.00, 0.67, 0.70, 0.69, 0.76]
    s7 = {r.key: r.paper for r in TABLES["llama13b"].rows}
    assert s7 == {"baseline": {"mmlu": 51.1, "params": "117.9M", "time": 1.00},
                  "mtlora": {"mmlu": 51.9, "params": "88.5M", "time": 0.73}}
    assert TABLES["llama13b"].tracks == ("dolly_mmlu",) and "13b" in TABLES["llama13b"].paper_model


def test_run_identity_holds_model_data_flags_and_seed(tmp_path):
    models = [write_tiny_model_folder(tmp_path / name, seed=i) for i, name in enumerate(("a", "b"))]
    data = write_multitask_records(tmp_path / "train.jsonl")
    track = Track("toy", str(data), ("heldout",), 2, 1.0, heldout_data=str(data))
    scale = replace(SCALES["small"], tracks=(track,))

    def run_dir(model, seed=1, key="baseline", **changes):
        settings = RunSettings(model, 1, tmp_path / "r", ".", ".", False)
        row = replace({r.key: r for r in TABLES["main_ablation"].rows}[key], **changes)
        return Job(settings, scale, TABLES["main_ablation"], track, row, seed).run_dir

    first = run_dir(models[0])
    assert first == run_dir(models[0]) and first.name.startswith("baseline-s1-")
    assert run_dir(models[1]) != first  # same flags, another model: another run
    assert run_dir(models[0], seed=2) != first
    assert run_dir(models[0], flags={"method": "hydralora"}) != first  # the balance loss off
    write_multitask_records(data, count=12)
    assert run_dir(models[0]) != first  # the data changed


def test_plan_puts_a_row_s_dependencies_first_and_runs_the_base_once():
    settings = RunSettings(None, 1, Path("/tmp/r"), ".", ".", True, seeds=(1, 2))
    scale, table = SCALES["small"], TABLES["main_results"]
    jobs = plan_jobs(table, scale, list(scale.tracks), settings, list(table.rows), with_base=True)
    kinds = [(j.kind, j.row.key, j.seed) for j in jobs]
    assert kinds.count(("base", "base", 1)) == 1 and not any(k[0] == "base" and k[2] == 2 for k in kinds)
    for job in jobs:
        if job.depends_on is not None:
            assert jobs.index(job.depends_on) < jobs.index(job)
            assert job.depends_on.kind == "library" and job.depends_on.seed == job.seed
    assert {j.row.key for j in jobs if j.row.needs_library} == {
        "task_arithmetic", "ties", "dare_linear", "dare_ties", "task_arithmetic_tuned", "ties_tuned",
        "dare_linear_tuned", "dare_ties_tuned", "lorahub", "mole"}
    # the paper scale's Flan-v2 track has no held-out split to tune on: its tuned merges are left out
    paper = SCALES["paper"]
    paper_jobs = plan_jobs(table, paper, list(paper.tracks), settings, list(table.rows), with_base=False)
    assert not any(j.kind == "merge_tuned" for j in paper_jobs) and any(j.kind == "merge" for j in paper_jobs)


def test_task_count_tracks_give_every_task_the_same_examples(tmp_path, monkeypatch):
    records = [{"instruction": f"{t} {i}", "input": "", "output": "x", "task_type": t}
               for t in ("a", "b", "c", "d") for i in range(6 if t != "c" else 3)]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    scale = replace(SCALES["small"], tracks=(Track("pool", str(data), ("heldout", "lm_eval"), 2, 1.0,
                                                   heldout_data=str(data), harness_rows=("baseline",)),),
                    task_counts=(1, 3), task_count_examples=4)
    settings = RunSettings(None, 1, tmp_path / "r", ".", ".", False)
    tracks = task_count_tracks(scale, settings)
    assert [t.name for t in tracks] == ["tasks1", "tasks3"]
    assert all(t.suites == ("heldout", "lm_eval") and t.harness_rows == () for t in tracks)  # no harness rows
    three = [json.loads(line) for line in Path(tracks[1].train_data).read_text().splitlines()]
    assert sorted({r["task_type"] for r in three}) == ["a", "b", "d"]  # c has too few examples
    assert all(sum(r["task_type"] == t for r in three) == 4 for t in ("a", "b", "d"))
    with pytest.raises(SystemExit, match="task count 5 exceeds the 3 tasks with at least 4"):
        task_count_tracks(replace(scale, task_counts=(5,)), settings)


def test_bootstrap_interval_and_verdicts_on_known_cases():
    rng = np.random.default_rng(0)
    baseline = rng.integers(0, 2, (3, 400)).astype(float)
    better = np.maximum(baseline, rng.integers(0, 2, (3, 400)) * (rng.random((3, 400)) < 0.4))
    result = paired_bootstrap(better, baseline, groups=np.repeat(np.arange(4), 100), seed=1)
    exact = float((better - baseline).reshape(3, 4, 100).mean(-1).mean())
    assert result["difference"] == pytest.approx(exact) and result["low"] < exact < result["high"]
    assert result["low"] > 0 and result["verdict"] == "supported"
    same = paired_bootstrap(baseline, baseline)
    assert same["difference"] == same["low"] == same["high"] == 0 and same["verdict"] == "not supported"
    assert paired_bootstrap(better, baseline, seed=1) == paired_bootstrap(better, baseline, seed=1)  # seeded
    assert verdict(-0.03, -0.01) == "not supported" and verdict(-0.004, 0.004) == "not supported"
    assert verdict(-0.01, 0.02) == "inconclusive" and verdict(0.001, 0.02) == "supported"
    assert mean_std([0.1, 0.2, 0.3]) == (pytest.approx(0.2), pytest.approx(0.1)) and mean_std([0.5]) == (0.5, None)


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_multitask_records(data / "train.jsonl", count=48)
    write_multitask_records(data / "eval.jsonl", count=6, seed=1)
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    items = [{"input": f"{a} + {b} =", "target": str(a + b)} for a in range(3) for b in range(2)]
    (bbh / "toy_sums.json").write_text(json.dumps(items))
    track = Track("toy", str(data / "train.jsonl"), ("heldout", "bbh"), 2, 1.0, heldout_data=str(data / "eval.jsonl"),
                  prepare="bash scripts/prepare_small_data.sh")
    scale = replace(SCALES["small"], name="tiny", tracks=(track,), effective_batch_size=8,
                    training={"per_device_train_batch_size": 8, "num_train_epochs": 1, "max_seq_length": 48,
                              "learning_rate": 1e-3, "save_steps": 100},
                    eval_limits={"heldout": 2, "bbh": 2}, eval_batch_size=4)
    monkeypatch.setitem(registry.SCALES, "tiny", scale)
    monkeypatch.setitem(TABLES, "main_ablation", replace(TABLES["main_ablation"], scales=("tiny",)))
    return RunSettings(model_name_or_path=str(tiny_model_dir), num_gpus=1, results_dir=tmp_path / "results",
                       bbh_dir=str(bbh), mmlu_dir=str(bbh), use_cuda=False, seeds=(1, 2))


@pytest.mark.slow
def test_run_table_trains_every_seed_aggregates_and_resumes(tiny_setup):
    output = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"])
    rows = {r["key"]: r for r in output["rows"]}
    assert set(rows) == {"base", "baseline", "mtlora"} and len(output["per_seed"]) == 5
    for key in ("baseline", "mtlora"):
        assert rows[key]["seeds"] == [1, 2] and rows[key]["trainable_params"] > 0
        values = rows[key]["heldout"]["values"]
        assert len(values) == 2 and rows[key]["heldout"]["mean"] == pytest.approx(sum(values) / 2)
        assert 0 <= rows[key]["bbh"]["mean"] <= 1 and rows[key]["gpu_minutes"] > 0
    assert rows["base"]["seeds"] == [1] and rows["base"]["heldout"]["std"] is None
    assert rows["mtlora"]["versus"]["key"] == "baseline" and "versus" not in rows["baseline"]
    versus = rows["mtlora"]["versus"]["metrics"]
    assert set(versus) == {"heldout", "bbh"} and versus["bbh"]["seeds"] == 2 and versus["bbh"]["items"] == 2
    table_md = (tiny_setup.results_dir / "tiny" / "main_ablation.md").read_text()
    assert "+ block + spectral" not in table_md and "44.5 ± 0.3" in table_md and "GPU-minutes" in table_md

    # a second run does nothing: every job's folder and evaluation are found (here two jobs at a time)
    run_dirs = [Path(r["run_dir"]) for r in output["per_seed"]]
    logs = {d: (d / "train.log").read_text() for d in run_dirs if (d / "train.log").is_file()}
    again = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"], parallel=2)
    assert {d: (d / "train.log").read_text() for d in logs} == logs and again["rows"] == output["rows"]
    for run_dir in logs:  # results moved without their weights (scripts/pack_results.py) are finished too
        for weights in run_dir.rglob("*.safetensors"):
            weights.unlink()
    moved = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"])
    assert {d: (d / "train.log").read_text() for d in logs} == logs and moved["rows"] == output["rows"]

    # an evaluation made on other data is not reused; a killed run's evaluation is redone after retraining
    baseline_dir = next(Path(r["run_dir"]) for r in output["per_seed"] if r["key"] == "baseline")
    identity = baseline_dir / "eval" / "heldout" / "identity.json"
    identity.write_text(json.dumps({**json.loads(identity.read_text()), "data": "other"}))
    (baseline_dir / "eval" / "heldout" / "summary.json").write_text(json.dumps({"average": {"exact": 9.0}}))
    third = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline"], with_base=False, parallel=2)
    assert all(0 <= v <= 1 for v in third["rows"][0]["heldout"]["values"])

    # --assemble_only tabulates what has finished, without training or evaluating
    assembled = run_table("main_ablation", "tiny", replace(tiny_setup, seeds=(1, 2, 3)), only_rows=["baseline"],
                          with_base=False, assemble_only=True)
    assert assembled["rows"][0]["seeds"] == [1, 2, 3] and len(assembled["rows"][0]["heldout"]["values"]) == 2

    # a seed whose evaluation is missing on one side is left out of the paired interval, not the whole metric
    mtlora_dir = next(Path(r["run_dir"]) for r in output["per_seed"] if r["key"] == "mtlora" and r["seed"] == 2)
    (mtlora_dir / "eval" / "heldout" / "predictions.json").unlink()
    partial = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"], assemble_only=True)
    versus = next(r for r in partial["rows"] if r["key"] == "mtlora")["versus"]["metrics"]
    assert versus["heldout"]["seeds"] == 1 and versus["bbh"]["seeds"] == 2


@pytest.mark.slow
def test_a_tuned_merge_keeps_the_grid_point_best_on_held_out(tiny_setup, monkeypatch):
    """The main table's merge rows end to end on a tiny model: the per-task library, the authors' default merge and
    the tuned one, which scores every grid point on the held-out split and keeps the best (never a test benchmark)."""
    from mtlora import merging

    monkeypatch.setitem(TABLES, "main_results", replace(TABLES["main_results"], scales=("tiny",)))
    monkeypatch.setitem(merging.GRIDS, "task_arithmetic", {"weight": (0.4, 3.0), "density": (None,)})
    settings = replace(tiny_setup, seeds=(1,))
    output = run_table("main_results", "tiny", settings, only_rows=["task_arithmetic", "task_arithmetic_tuned"],
                       with_base=False)
    per_seed = {r["key"]: r for r in output["per_seed"]}
    tuning = per_seed["task_arithmetic_tuned"]["merge_tuning"]
    uniform = f"task_arithmetic_l{1 / 3:g}"  # lambda = 1/N, uniform averaging of the tiny data's 3 tasks
    assert set(tuning["scores"]) == {uniform, "task_arithmetic_l0.4", "task_arithmetic_l3"}
    assert tuning["selected_on"] == "heldout"
    assert tuning["chosen"] == max(tuning["scores"], key=lambda k: tuning["scores"][k])
    tuned = Path(per_seed["task_arithmetic_tuned"]["run_dir"])
    assert (tuned / "merged" / "config.json").is_file() and not list((tuned / "grid").glob("*/merged"))
    chosen = json.loads((tuned / "merged" / "merge_summary.json").read_text())
    assert chosen["lambda"] == tuning["lambda"]
    assert all(per_seed[k]["heldout"] is not None and per_seed[k]["bbh"] is not None for k in per_seed)
    assert Path(per_seed["task_arithmetic"]["run_dir"]) != tuned

    # results moved without weights or tokenizer (scripts/pack_results.py) keep merged/config.json only: a suite
    # still to evaluate merges again instead of loading the bare folder
    for key in per_seed:
        merged = Path(per_seed[key]["run_dir"]) / "merged"
        for path in merged.iterdir():
            if path.name != "config.json":
                path.unlink()
    shutil.rmtree(Path(per_seed["task_arithmetic"]["run_dir"]) / "eval" / "bbh")
    again = run_table("main_results", "tiny", settings, only_rows=["task_arithmetic", "task_arithmetic_tuned"],
                      with_base=False)
    assert {r["key"]: r["bbh"] for r in again["per_seed"]} == {k: r["bbh"] for k, r in per_seed.items()}
    assert is_saved_model(Path(per_seed["task_arithmetic"]["run_dir"]) / "merged")
    assert not is_saved_model(tuned / "merged")  # finished: not merged again


@pytest.mark.slow
def test_the_library_rows_lorahub_mole_and_mmoelora_run_through_the_table(tiny_setup, monkeypatch):
    """The rest of the main table end to end on a tiny model: LoRAHub and MoLE over the per-task library (one library
    per seed, shared by both), MMoELoRA trained with its task gates. MoLE trains 20 steps here, not its authors' 800."""
    table = TABLES["main_results"]
    rows = tuple(replace(r, training={**r.training, "max_steps": 20}) if r.kind == "mole" else r for r in table.rows)
    monkeypatch.setitem(TABLES, "main_results", replace(table, scales=("tiny",), rows=rows))
    output = run_table("main_results", "tiny", replace(tiny_setup, seeds=(1,)), only_rows=["lorahub", "mole", "mmoelora"],
                       with_base=False)
    per_seed = {r["key"]: r for r in output["per_seed"]}
    assert set(per_seed) == {"lorahub", "mole", "mmoelora"}
    assert all(r["heldout"] is not None and r["bbh"] is not None for r in per_seed.values())
    assert per_seed["mole"]["trainable_params"] > 0 and per_seed["mmoelora"]["trainable_params"] > 0
    mole_log = json.loads((Path(per_seed["mole"]["run_dir"]) / "train_summary.json").read_text())
    assert mole_log["global_step"] == 20
    libraries = {Path(r["run_dir"]).parent for r in output["per_seed"]}
    assert len(list(next(iter(libraries)).glob("library-s1-*"))) == 1  # one library, read by LoRAHub and MoLE


def test_missing_training_data_is_reported_with_the_prepare_command(tiny_setup, tmp_path):
    scale = registry.SCALES["tiny"]
    registry.SCALES["tiny"] = replace(scale, tracks=(replace(scale.tracks[0], train_data=str(tmp_path / "pool.jsonl")),))
    with pytest.raises(SystemExit, match="is missing; prepare it with: bash scripts/prepare_small_data.sh"):
        run_table("main_ablation", "tiny", tiny_setup)


def test_missing_paper_model_is_reported_before_any_work(tmp_path):
    settings = RunSettings(model_name_or_path=str(tmp_path / "Llama-2-7b-hf"), num_gpus=1, results_dir=tmp_path / "r",
                           bbh_dir=str(tmp_path), mmlu_dir=str(tmp_path), use_cuda=False)
    with pytest.raises(SystemExit, match="--model_name_or_path .*Llama-2-7b-hf: cannot load the model config"):
        run_table("main_ablation", "paper", settings)
    assert not (tmp_path / "r").exists()


def test_the_lm_eval_suite_is_read_as_the_cloze_metric(tiny_model_dir, tmp_path):
    from mtlora.experiments.evaluate import evaluate_run
    from mtlora.experiments.results import METRICS
    from tests.helpers import write_mmlu_folder

    mmlu = write_mmlu_folder(tmp_path / "mmlu", subjects=("anatomy", "astronomy"), num_test=2)
    evaluate_run(tmp_path / "run", ["lm_eval"], str(tiny_model_dir), None, {"lm_eval": str(mmlu)}, {}, 4, "cpu",
                 torch.float32)
    cloze = {m.name: m for m in METRICS}["mmlu_cloze"]
    average, (scores, groups) = cloze.average(tmp_path / "run"), cloze.item_scores(tmp_path / "run")
    assert len(scores) == 4 and sorted(set(groups)) == ["mmlu_anatomy_continuation", "mmlu_astronomy_continuation"]
    assert average == pytest.approx(scores.mean())


def test_the_lm_eval_mmlu_bbh_suite_reads_both_data_folders(tiny_model_dir, tmp_path):
    from mtlora.experiments.evaluate import evaluate_run
    from tests.helpers import write_bbh_folder, write_mmlu_folder

    mmlu = write_mmlu_folder(tmp_path / "mmlu", subjects=("anatomy",), num_test=2)
    bbh = write_bbh_folder(tmp_path / "bbh")
    (bbh / "labels.json").rename(bbh / "boolean_expressions.json")
    evaluate_run(tmp_path / "run", ["lm_eval_mmlu_bbh"], str(tiny_model_dir), None,
                 {"lm_eval_mmlu_bbh": (str(mmlu), str(bbh))}, {"lm_eval_mmlu_bbh": 1}, 4, "cpu", torch.float32)
    summary = json.loads((tmp_path / "run" / "eval" / "lm_eval_mmlu_bbh" / "summary.json").read_text())
    assert set(summary["results"]) == {"mmlu_anatomy", "bbh_fewshot_boolean_expressions"}
    assert summary["settings"]["engine"] == "batched" and summary["settings"]["limit"] == 1


@pytest.fixture
def pack_results():
    """scripts/pack_results.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pack_results", Path(__file__).parents[1] / "scripts" / "pack_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_results_keep_what_the_tables_read_and_drop_weights(tmp_path, pack_results):
    import tarfile

    run = tmp_path / "results" / "small" / "runs" / "bigbench" / "mtlora-s42"
    (run / "eval" / "heldout").mkdir(parents=True)
    long_task = "bigbench_" + "x" * 40
    items = [{"task_type": long_task, "exact": True, "generation": "g" * 100, "output": "short"}]
    (run / "eval" / "heldout" / "predictions.json").write_text(json.dumps({"predictions": items}))
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    archive = tmp_path / "packed.tar.gz"
    assert pack_results.pack(tmp_path / "results", archive) == 1
    with tarfile.open(archive) as tar:
        packed = json.load(tar.extractfile("small/runs/bigbench/mtlora-s42/eval/heldout/predictions.json"))
    assert packed["predictions"] == [{"task_type": long_task, "exact": True, "output": "short"}]


def test_a_file_deleted_while_packing_is_left_out_and_the_rest_packed(tmp_path, monkeypatch, capsys, pack_results):
    import tarfile

    grid = tmp_path / "results" / "small" / "runs" / "bigbench" / "ties_tuned-s44" / "grid" / "ties_d0.1_l1" / "merged"
    grid.mkdir(parents=True)
    (grid / "config.json").write_text("{}")
    (grid.parents[2] / "timings.json").write_text("{}")
    read = pack_results.packed_bytes

    def deleted_first(path, relative):  # the tuning job removes its grid folder between listing and reading
        if path.name == "config.json":
            path.unlink()
        return read(path, relative)

    monkeypatch.setattr(pack_results, "packed_bytes", deleted_first)
    archive = tmp_path / "packed.tar.gz"
    assert pack_results.pack(tmp_path / "results", archive) == 1
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["small/runs/bigbench/ties_tuned-s44/timings.json"]
    assert "config.json was deleted while packing; left out" in capsys.readouterr().err


RUNNER_WITH_A_STEP = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tqdm import tqdm
from mtlora.experiments.runner import run_step, stop_steps_with_the_runner

folder, where = Path(sys.argv[1]), sys.argv[2]
stop_steps_with_the_runner()
child = [sys.executable, "-c", f"import os, time; open({str(folder / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(300)"]
step = lambda: run_step(child, folder / "step.log", folder, tqdm(disable=True), "sleeping")
if where == "threaded":  # as run_jobs with --parallel: the step waits in a worker thread
    with ThreadPoolExecutor(1) as pool:
        pool.submit(step).result()
else:
    step()
"""


@pytest.mark.parametrize("where", ["serial", "threaded"])
def test_sigterm_to_the_runner_ends_its_running_step(tmp_path, where):
    import os
    import signal
    import subprocess
    import sys
    import time

    runner = subprocess.Popen([sys.executable, "-c", RUNNER_WITH_A_STEP, str(tmp_path), where],
                              cwd=Path(__file__).parents[1])
    pid_file, deadline = tmp_path / "pid", time.time() + 120
    while not (pid_file.is_file() and pid_file.read_text()):
        assert runner.poll() is None and time.time() < deadline, "the step never started"
        time.sleep(0.2)
    child = int(pid_file.read_text())
    try:
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # ended and reaped, not left running on its own
            os.kill(child, 0)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_job_s_gpu_is_taken_from_the_gpus_the_runner_sees(monkeypatch):
    from mtlora.experiments.runner import visible_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert [visible_gpu(0), visible_gpu(1)] == ["1", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu(1) == "1"


def test_lm_eval_s_mmlu_and_bbh_run_for_the_harness_rows_at_the_first_seed(tmp_path):
    from mtlora.experiments.results import METRICS, collect

    data = write_multitask_records(tmp_path / "train.jsonl")
    track = Track("toy", str(data), ("heldout", "lm_eval"), 2, 1.0, heldout_data=str(data), harness_rows=("mtlora",))
    scale = replace(SCALES["small"], tracks=(track,))
    settings = RunSettings(None, 1, tmp_path / "r", str(tmp_path / "bbh"), str(tmp_path / "mmlu"), False, seeds=(7, 8))
    rows = {r.key: r for r in TABLES["main_ablation"].rows}
    suites = {(key, seed): Job(settings, scale, TABLES["main_ablation"], track, rows[key], seed).suites
              for key in ("baseline", "mtlora") for seed in (7, 8)}
    assert suites[("mtlora", 7)] == ("heldout", "lm_eval", "lm_eval_mmlu_bbh")
    assert suites[("mtlora", 8)] == suites[("baseline", 7)] == ("heldout", "lm_eval")
    # the scale's first seed, not the invocation's: one runner per seed must not give seed 43 the suite (and retrain
    # its finished runs for it)
    for seeds, harness in (((43,), 42), ((44, 42), 42), ((7, 8), 7)):
        split = replace(settings, seeds=seeds)  # the small scale's seeds are 42, 43, 44
        got = {seed for seed in (7, 8, 42, 43, 44)
               if "lm_eval_mmlu_bbh" in Job(split, scale, TABLES["main_ablation"], track, rows["mtlora"], seed).suites}
        assert got == {harness}, (seeds, got)
        # the base model is one run whatever seed its job carries (the invocation's first): it keeps the suite
        base = Job(split, scale, TABLES["main_ablation"], replace(track, harness_rows=("base",)), registry.BASE, seeds[0])
        assert "lm_eval_mmlu_bbh" in base.suites, seeds
    for folder in ("bbh", "mmlu"):
        (tmp_path / folder).mkdir()
    identity = Job(settings, scale, TABLES["main_ablation"], track, rows["mtlora"], 7).eval_identity("lm_eval_mmlu_bbh")
    assert len(identity["data"]) == 2  # both data folders: a change to either invalidates the suite

    jobs = {key: Job(settings, scale, TABLES["main_ablation"], track, rows[key], 7) for key in ("baseline", "mtlora")}
    for job in jobs.values():
        (job.run_dir / "eval" / "lm_eval_mmlu_bbh").mkdir(parents=True)
        (job.run_dir / "eval" / "lm_eval_mmlu_bbh" / "summary.json").write_text(json.dumps({"groups": {
            "mmlu": {"acc,none": 0.31}, "bbh_fewshot": {"exact_match,remove_whitespace": 0.12}}}))
    run = jobs["mtlora"].run_dir
    metrics = {m.name: m for m in METRICS}
    assert metrics["lm_eval_mmlu"].average(run) == 0.31 and metrics["lm_eval_bbh"].average(run) == 0.12
    collected = {key: collect(job) for key, job in jobs.items()}  # the table reads it for the harness rows only
    assert collected["mtlora"]["lm_eval_mmlu"] == 0.31 and collected["mtlora"]["lm_eval_bbh"] == 0.12
    assert "lm_eval_mmlu" not in collected["baseline"]


def test_a_table_reports_its_suites_and_a_shared_run_is_evaluated_on_all_of_them(tmp_path):
    from mtlora.experiments.runner import shared_jobs

    settings = RunSettings(None, 1, tmp_path / "r", ".", ".", True, seeds=(42, 43))
    data = write_multitask_records(tmp_path / "train.jsonl")
    scale = replace(SCALES["small"], tracks=(replace(SCALES["small"].tracks[0], train_data=str(data),
                                                     heldout_data=str(data)),))
    plan = {name: plan_jobs(TABLES[name], scale, list(scale.tracks), settings, list(TABLES[name].rows), False)
            for name in ("main_ablation", "routing_granularity")}
    by_row = {name: {(j.row.key, j.seed): j for j in jobs} for name, jobs in plan.items()}
    assert by_row["routing_granularity"][("component_g2", 42)].suites == ("heldout", "bbh")  # Table 3: no MMLU
    assert by_row["routing_granularity"][("baseline", 42)].suites == ("heldout", "bbh")
    full = by_row["main_ablation"][("baseline", 42)].suites
    assert full == ("heldout", "bbh", "mmlu", "lm_eval", "lm_eval_mmlu_bbh")
    # at the paper scale the table keeps every suite of its tracks (BBH on Flan-v2, MMLU on Dolly)
    paper = SCALES["paper"]
    assert [Job(settings, paper, TABLES["routing_granularity"], t, TABLES["routing_granularity"].rows[1], 42).suites
            for t in paper.tracks] == [("bbh",), ("mmlu",)]
    # the baseline both tables plan runs once, on the union of their suites, whichever table comes first
    for order in (("main_ablation", "routing_granularity"), ("routing_granularity", "main_ablation")):
        jobs = shared_jobs([j for name in order for j in plan[name]])
        baselines = [j for j in jobs if j.row.key == "baseline" and j.seed == 42]
        assert len(baselines) == 1 and set(baselines[0].suites) == set(full)
        assert len({j.run_dir for j in jobs}) == len(jobs)


def test_runs_moved_without_weights_are_finished_unless_a_pending_job_reads_them(tmp_path):
    """Packed results keep no weights: a trained, fully evaluated run is done; the HydraLoRA run that an unfinished
    naive-averaging job reads must be trained again, and a library only while a dependent is unfinished."""
    from mtlora.experiments.runner import finished_without_weights, weights_needed
    from mtlora.evaluation.reporting import write_json

    data = write_multitask_records(tmp_path / "train.jsonl")
    track = Track("toy", str(data), ("heldout",), 2, 1.0, heldout_data=str(data))
    scale = replace(SCALES["small"], tracks=(track,))
    settings = RunSettings(None, 1, tmp_path / "r", ".", ".", False, seeds=(1, 2))
    jobs = plan_jobs(TABLES["task_scaling"], scale, [track], settings, list(TABLES["task_scaling"].rows), False)
    by_key = {(j.row.key, j.seed): j for j in jobs}

    def finish(job, trained=True):
        if trained:
            write_json(job.run_dir / "train_summary.json", {"global_step": 1})
        for suite in job.suites:
            write_json(job.run_dir / "eval" / suite / "identity.json", job.eval_identity(suite))
            write_json(job.run_dir / "eval" / suite / "summary.json", {})

    for key in ("lora", "baseline", "mtlora"):
        for seed in (1, 2):
            finish(by_key[(key, seed)])
    finish(by_key[("naive_average", 1)], trained=False)  # seed 2's naive averaging is still to do
    table = results.tabulate(TABLES["task_scaling"], scale, settings, jobs, [])  # Table S3: LoRA vs naive averaging
    assert {r["key"]: (r.get("versus", {}).get("key"), r.get("versus", {}).get("claim")) for r in table["rows"]} == {
        "lora": ("naive_average", True), "naive_average": ("baseline", False), "baseline": (None, None),
        "mtlora": ("baseline", True)}
    needed = weights_needed(jobs)
    assert needed == {by_key[("baseline", 2)].run_dir}
    assert finished_without_weights(by_key[("baseline", 1)], needed)
    assert not finished_without_weights(by_key[("baseline", 2)], needed)  # its weights are read: train again
    assert finished_without_weights(by_key[("lora", 2)], needed)
    assert not finished_without_weights(by_key[("naive_average", 2)], needed)
    (by_key[("mtlora", 1)].run_dir / "train_summary.json").unlink()  # evaluated but never trained to the end
    assert not finished_without_weights(by_key[("mtlora", 1)], needed)

    library_jobs = plan_jobs(TABLES["main_results"], scale, [track], settings, [r for r in TABLES["main_results"].rows
                                                                                 if r.key == "ties"], False)
    library, ties = library_jobs[0], library_jobs[1]
    assert library.kind == "library" and ties.depends_on is library
    assert not finished_without_weights(library, weights_needed(library_jobs))
    finish(ties, trained=False)
    assert finished_without_weights(library, weights_needed(library_jobs))


def test_the_evaluator_names_the_missing_data_flag_of_each_suite(tmp_path, capsys):
    from mtlora.experiments.evaluate import main as evaluate_main

    (tmp_path / "mmlu").mkdir()
    for suites, given, flag in (("lm_eval_mmlu_bbh", ["--mmlu_dir", str(tmp_path / "mmlu")], "--bbh_dir"),
                                ("lm_eval_mmlu_bbh", [], "--mmlu_dir"), ("heldout", [], "--heldout_data")):
        with pytest.raises(SystemExit):
            evaluate_main(["--run_dir", str(tmp_path / "run"), "--suites", suites, *given])
        assert f"{flag}: needed for suite {suites}, got None" in capsys.readouterr().err


@pytest.mark.parametrize("use_cuda", [True, False])
def test_merges_and_lorahub_run_on_the_job_s_device(tiny_setup, monkeypatch, use_cuda):
    """A merge or a LoRAHub search runs where the job's evaluation runs: on a GPU machine on the job's GPU (a TIES merge
    of 64 adapters on the CPU, beside other jobs, took minutes per merge), else on the CPU."""
    from mtlora.experiments import runner

    commands = []
    monkeypatch.setattr(runner, "run_step", lambda command, *args, **kwargs: commands.append(command) or 0.0)
    settings = replace(tiny_setup, seeds=(1,), use_cuda=use_cuda)
    scale = SCALES["tiny"]
    table = replace(TABLES["main_results"], scales=("tiny",))
    jobs = {j.row.key: j for j in plan_jobs(table, scale, list(scale.tracks), settings,
                                            [r for r in table.rows if r.key in ("ties", "lorahub")], False)}
    (jobs["library"].run_dir / "task_a").mkdir(parents=True)
    (jobs["library"].run_dir / "task_a" / "adapter_config.json").write_text("{}")
    for key in ("ties", "lorahub"):
        runner._produce(jobs[key], None, {}, None)
    device = "cuda" if use_cuda else "cpu"
    assert len(commands) == 2 and all(c[c.index("--device") + 1] == device for c in commands)
    evaluation = jobs["ties"].evaluation_command(None, "m")
    assert evaluation[evaluation.index("--device") + 1] == device
