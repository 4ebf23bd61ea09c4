"""The table runner end to end on a tiny model: trains, evaluates, tabulates, and skips finished rows."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mtlora.experiments import registry
from mtlora.experiments.registry import SCALES, TABLES, Track
from mtlora.experiments.runner import RunSettings, as_cli, run_table, train_flags
from tests.helpers import write_multitask_records


def test_registry_rows_give_the_paper_flags():
    full = {r.key: r for r in TABLES["main_ablation"].rows}["mtlora"]
    flags = train_flags(full, SCALES["paper"].tracks[0], hidden_size=4096)
    assert flags["routing_group_size"] == 2048 and flags["spectral_reg_steps"] == 500 and flags["enable_blc"]
    assert [train_flags(r, SCALES["paper"].tracks[1], 4096)["routing_group_size"]
            for r in TABLES["routing_granularity"].rows] == [4096, 2048, 512, 256, 128]
    assert as_cli({"enable_blc": True, "lora_rank": 16, "x": None, "y": False}) == ["--enable_blc", "--lora_rank", "16"]


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
    track = Track("toy", str(data / "train.jsonl"), ("heldout", "bbh"), 2, 1.0, heldout_data=str(data / "eval.jsonl"))
    scale = replace(SCALES["small"], name="tiny", tracks=(track,), effective_batch_size=8,
                    training={"per_device_train_batch_size": 8, "num_train_epochs": 1, "max_seq_length": 48,
                              "learning_rate": 1e-3, "save_steps": 100},
                    eval_limits={"heldout": 2, "bbh": 2}, eval_batch_size=4)
    monkeypatch.setitem(registry.SCALES, "tiny", scale)
    monkeypatch.setitem(TABLES, "main_ablation", replace(TABLES["main_ablation"], scales=("tiny",)))
    return RunSettings(model_name_or_path=str(tiny_model_dir), num_gpus=1, results_dir=tmp_path / "results",
                       bbh_dir=str(bbh), mmlu_dir=str(bbh), use_cuda=False)


def test_run_table_trains_evaluates_and_skips_finished_rows(tiny_setup):
    output = run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"])
    rows = {r["key"]: r for r in output["rows"]}
    assert set(rows) == {"base", "baseline", "mtlora"}
    for key in ("baseline", "mtlora"):
        assert rows[key]["trainable_params"] > 0 and 0 <= rows[key]["heldout_exact"] <= 1
        assert 0 <= rows[key]["bbh_lenient"] <= 1
    assert "trainable_params" not in rows["base"] and 0 <= rows["base"]["heldout_exact"] <= 1
    table_md = (tiny_setup.results_dir / "tiny" / "main_ablation.md").read_text()
    assert "+ block + spectral" not in table_md and "mtLoRA" in table_md and "44.5" in table_md
    logs = {key: Path(rows[key]["run_dir"], "train.log").read_text() for key in ("baseline", "mtlora")}
    run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline", "mtlora"])
    assert logs == {key: Path(rows[key]["run_dir"], "train.log").read_text() for key in ("baseline", "mtlora")}

    # a run whose adapter is gone is trained again, and its old evaluation is not reused
    baseline_dir = Path(rows["baseline"]["run_dir"])
    (baseline_dir / "adapter_model.safetensors").unlink()
    stale = baseline_dir / "eval" / "heldout" / "summary.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "average": {"exact": 9.0, "lenient": 9.0}}))
    again = {r["key"]: r for r in run_table("main_ablation", "tiny", tiny_setup, only_rows=["baseline"])["rows"]}
    assert again["baseline"]["heldout_exact"] <= 1


def test_missing_training_data_is_reported_with_the_prepare_command(tiny_setup, tmp_path):
    scale = registry.SCALES["tiny"]
    registry.SCALES["tiny"] = replace(scale, tracks=(replace(scale.tracks[0], train_data=str(tmp_path / "bigbench.jsonl")),))
    with pytest.raises(SystemExit, match="is missing; prepare it with: bash scripts/prepare_small_data.sh"):
        run_table("main_ablation", "tiny", tiny_setup)


def test_missing_paper_model_is_reported_before_any_work(tmp_path):
    settings = RunSettings(model_name_or_path=str(tmp_path / "Llama-2-7b-hf"), num_gpus=1, results_dir=tmp_path / "r",
                           bbh_dir=str(tmp_path), mmlu_dir=str(tmp_path), use_cuda=False)
    with pytest.raises(SystemExit, match="--model_name_or_path .*Llama-2-7b-hf: cannot load the model config"):
        run_table("main_ablation", "paper", settings)
    assert not (tmp_path / "r").exists()
