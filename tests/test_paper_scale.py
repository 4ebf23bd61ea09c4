"""Dry runs at paper scale: random-weight models from config-only folders, synthetic data with a documented
length distribution, the memory plan, dry-run table jobs, and the paper-scale benchmark's CPU path."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data.synthetic import BIGBENCH_POOL, QUANTILES, measure_lengths, synthetic_records
from mtlora.errors import InvalidInput, MissingInput
from mtlora.experiments import dry_run, memory_plan, registry
from mtlora.experiments.jobs import Job, RunSettings
from mtlora.experiments.registry import SCALES, TABLES, Track
from mtlora.loading import ModuloTokenizer, build_random_model, load_model_for_eval, load_tokenizer
from mtlora.prompts import encode_prompts
from mtlora.training import run_training
from tests.helpers import (REPO, REPO_CONFIGS, TOKENIZER_DIR, training_arguments, write_bbh_folder, write_config_folder,
                           write_mmlu_folder, write_multitask_records)

LLAMA7B = str(REPO_CONFIGS / "llama-2-7b")
LLAMA13B = str(REPO_CONFIGS / "llama-2-13b")


def _synthetic(path: Path, tokenizer, count: int = 24, table=None) -> Path:
    table = table or {**BIGBENCH_POOL, "prompt": tuple(min(v, 40) for v in BIGBENCH_POOL["prompt"])}
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(tokenizer, count, table)))
    return path


def _dry_run_arguments(tmp_path, tokenizer, **overrides):
    model = write_config_folder(tmp_path / "config")
    args = training_arguments(model, _synthetic(tmp_path / "train.jsonl", tokenizer), tmp_path / "out", max_steps=3,
                              save_steps=100, include_num_input_tokens_seen=True, **overrides)
    args[0].random_init, args[0].tokenizer_name_or_path = True, str(TOKENIZER_DIR)
    return args


# ----------------------------------------------------------------------------------- train.py --random_init

def test_random_init_trains_from_a_config_only_folder(tmp_path, tokenizer):
    summary = run_training(*_dry_run_arguments(tmp_path, tokenizer))
    assert summary["global_step"] == 3 and len(summary["step_seconds"]) == 3
    assert all(s > 0 for s in summary["step_seconds"]) and all(t > 0 for t in summary["step_tokens"])
    identity = json.loads((tmp_path / "out" / "run_identity.json").read_text())
    assert identity["model"]["random_init_seed"] == 0 and identity["model"]["weights"] == []
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_train_py_flags_of_a_dry_run(tmp_path, tokenizer):
    from train import main

    model = write_config_folder(tmp_path / "config")
    data = _synthetic(tmp_path / "train.jsonl", tokenizer, count=8)
    main(["--model_name_or_path", model, "--random_init", "--tokenizer_name_or_path", str(TOKENIZER_DIR),
          "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--max_seq_length", "48", "--use_cpu", "--lora_nums", "2"])
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["global_step"] == 2


def test_a_config_only_folder_needs_random_init_and_a_tokenizer(tmp_path, tokenizer, no_model_loading):
    args = _dry_run_arguments(tmp_path, tokenizer)
    args[0].random_init = False
    with pytest.raises(InvalidInput, match="holds only config.json.*--random_init"):
        run_training(*args)
    args[0].random_init, args[0].tokenizer_name_or_path = True, None
    with pytest.raises(InvalidInput, match="--tokenizer_name_or_path"):
        run_training(*args)
    args[0].tokenizer_name_or_path = str(tmp_path / "no_tokenizer")
    with pytest.raises(MissingInput, match="--tokenizer_name_or_path .*no_tokenizer: no such file"):
        run_training(*args)
    args[0].tokenizer_name_or_path = str(tmp_path / "config")  # a folder, but no tokenizer in it
    with pytest.raises(MissingInput, match="--tokenizer_name_or_path .*no tokenizer files"):
        run_training(*args)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tokenizer):
    args = _dry_run_arguments(tmp_path, tokenizer)
    write_config_folder(tmp_path / "config", vocab_size=128)  # the SmolLM2 ids of the words are larger
    with pytest.raises(InvalidInput, match="outside the model's vocabulary of 128"):
        run_training(*args)


def test_random_model_is_seeded_and_leaves_the_caller_s_random_state(tmp_path):
    folder = write_config_folder(tmp_path / "config")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = build_random_model(folder), build_random_model(folder, dtype=torch.bfloat16)
    assert torch.equal(torch.rand(3), expected)
    assert second.dtype == torch.bfloat16 and first.model.layers[0].mlp.up_proj.weight.std() > 0
    for a, b in zip(first.state_dict().values(), build_random_model(folder).state_dict().values()):
        assert torch.equal(a, b)


def test_evaluating_a_random_model_folds_a_larger_tokenizer(tmp_path):
    folder = write_config_folder(tmp_path / "config")
    model, tokenizer = load_model_for_eval(folder, random_init=True, tokenizer_name_or_path=str(TOKENIZER_DIR))
    assert isinstance(tokenizer, ModuloTokenizer) and tokenizer.vocab == 32000
    assert max(tokenizer("a long word: antidisestablishmentarianism").input_ids) < 32000
    assert load_tokenizer(str(TOKENIZER_DIR), "--tokenizer_name_or_path").pad_token is not None  # tokenizer-only folder


# -------------------------------------------------------------------------------------------- synthetic data

def test_synthetic_records_have_exactly_the_drawn_lengths(tokenizer):
    table = {"quantiles": QUANTILES, "prompt": (37,) * len(QUANTILES), "response": (9,) * len(QUANTILES)}
    records = synthetic_records(tokenizer, 20, table, num_tasks=4, max_token_id=20_000)
    assert {len(ids) for ids in encode_prompts(tokenizer, records)} == {37}
    assert {len(tokenizer.encode(r["output"], add_special_tokens=False)) + 1 for r in records} == {9}
    assert max(max(tokenizer.encode(r["instruction"] + " " + r["output"])) for r in records) < 20_000
    assert sorted({r["task_type"] for r in records}) == [f"synthetic_0{i}" for i in range(4)]


def test_synthetic_lengths_follow_the_table(tokenizer):
    measured = measure_lengths(synthetic_records(tokenizer, 1500, seed=1), tokenizer, "draws")
    for part in ("prompt", "response"):
        for q in (0.25, 0.5, 0.75, 0.9):
            target, got = BIGBENCH_POOL[part][QUANTILES.index(q)], measured[part][QUANTILES.index(q)]
            assert abs(got - target) <= max(2, 0.2 * target), (part, q, got, target)


def test_prepare_synthetic_writes_records_and_their_lengths(tmp_path):
    from data.prepare import main

    source = write_multitask_records(tmp_path / "source.jsonl", count=30)
    assert main(["synthetic", "--num_examples", "12", "--lengths_from", str(source), "--output_dir",
                 str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert summary["num_examples"] == 12 and summary["lengths"]["source"] == str(source)
    assert len((tmp_path / "out" / "train.jsonl").read_text().splitlines()) == 12


def test_the_built_in_table_is_the_measured_bigbench_pool(tokenizer):
    pool = REPO / "data" / "processed" / "bigbench" / "train.jsonl"
    if not pool.is_file():
        pytest.skip(f"{pool} not prepared (bash scripts/prepare_small_data.sh)")
    from mtlora.training_data import read_instruction_records

    measured = measure_lengths(read_instruction_records(pool), tokenizer, "pool")
    assert measured["prompt"] == BIGBENCH_POOL["prompt"] and measured["response"] == BIGBENCH_POOL["response"]


# ---------------------------------------------------------------------------------------------- memory plan

def test_memory_formula_grows_with_the_batch_and_shrinks_with_checkpointing():
    shape = memory_plan.step_shape(LLAMA7B, TABLES["main_ablation"].rows[0].flags)
    with_ckpt = [memory_plan.formula_peak_gib(shape, b, 512, True) for b in (1, 2, 4, 8, 16)]
    without = [memory_plan.formula_peak_gib(shape, b, 512, False) for b in (1, 2, 4, 8, 16)]
    assert with_ckpt == sorted(with_ckpt) and without == sorted(without)
    assert all(a < b for a, b in zip(with_ckpt, without))
    assert shape.trainable_params == 75_497_472 and shape.family == "component"  # the paper's 75.5M


def test_the_formula_keeps_the_routed_code_and_one_adapter_s_per_expert_masks():
    """Fine-grained routing keeps a G x E x r routing-weighted code per token; the reference component level's E
    masked inputs are recomputed in the backward pass, one adapter at a time. Against the peaks SmolLM2 measured at
    32 x 512 without checkpointing on an H200 (the small tables' train_summary.json files), the formula is within
    -5% / +15%."""
    rows = {r.key: r.flags for t in ("main_ablation", "routing_granularity") for r in TABLES[t].rows}
    hydra, g32 = memory_plan.step_shape(LLAMA7B, rows["baseline"]), memory_plan.step_shape(LLAMA7B, rows["component_g32"])
    assert hydra.expert_dropout_width == 16 * 4096 and hydra.folded_width == 2 * 1 * 16 * 16  # q_proj, v_proj
    assert g32.expert_dropout_width == 0 and g32.folded_width == 2 * 32 * 16 * 16
    for key, measured_gib in (("component_g2", 21.6), ("component_g32", 38.5), ("mtlora", 19.9)):
        planned = memory_plan.formula_peak_gib(memory_plan.step_shape(None, rows[key]), 32, 512, False)
        assert 0.95 * measured_gib <= planned <= 1.15 * measured_gib, key
    # HydraLoRA: what component_g2 keeps, less its routed code, plus one adapter's masks (not 30 layers' of them)
    plan = {key: memory_plan.formula_peak_gib(memory_plan.step_shape(None, rows[key]), 32, 512, False)
            for key in ("baseline", "component_g2")}
    assert abs(plan["baseline"] - plan["component_g2"]) < 1.0


def test_the_measured_table_gives_the_readme_s_card_sizes():
    """README's GPU-size table (HydraLoRA 8 x 4 and mtLoRA 16 x 2 on a 24 GB card; 13B from 40 GB up)."""
    hydra, mtlora = TABLES["main_ablation"].rows[0].flags, TABLES["main_ablation"].rows[-1].flags
    assert memory_plan.choose_micro_batch(LLAMA7B, hydra, 32, 16, 512, True, 22.0).micro_batch == 8
    assert memory_plan.choose_micro_batch(LLAMA7B, mtlora, 32, 16, 512, True, 22.0).micro_batch == 16
    assert memory_plan.choose_micro_batch(LLAMA13B, hydra, 32, 16, 512, True, 39.0).micro_batch == 16
    with pytest.raises(InvalidInput):
        memory_plan.choose_micro_batch(LLAMA7B, mtlora, 32, 16, 512, True, 14.5)


def test_the_plan_keeps_the_effective_batch_and_refuses_what_cannot_fit():
    flags = TABLES["main_ablation"].rows[0].flags
    large = memory_plan.choose_micro_batch(LLAMA7B, flags, 32, 16, 512, True, 79.0)
    small = memory_plan.choose_micro_batch(LLAMA7B, flags, 32, 16, 512, True, 19.0)
    assert (large.micro_batch, large.accumulation) == (16, 2)
    assert small.micro_batch < 16 and small.micro_batch * small.accumulation == 32
    assert memory_plan.fits(small.peak_gib, 19.0) and small.source == "measured"  # MEASURED_PEAK_GIB covers it
    assert memory_plan.choose_micro_batch(LLAMA7B, flags, 32, 16, 1024, True, 79.0).source == "formula"
    with pytest.raises(InvalidInput, match="--gpu_memory_gb 22.0: .* does not fit .*ds_zero3_offload"):
        memory_plan.choose_micro_batch(LLAMA13B, flags, 32, 16, 512, True, 22.0)


def test_measured_peaks_replace_the_formula():
    flags = TABLES["main_ablation"].rows[0].flags
    shape = memory_plan.step_shape(LLAMA7B, flags)
    measured = {("llama-2-7b", "component", True): {"trainable_params": shape.trainable_params - 1000,
                                                    "peak_gib": {16: 15.0}}}
    peak, source = memory_plan.planned_peak_gib(shape, 16, 512, True, measured)
    assert source == "measured" and peak == pytest.approx(15.0 + 16 * 1000 / 2**30)
    assert memory_plan.planned_peak_gib(shape, 8, 512, True, measured)[1] == "formula"


# ------------------------------------------------------------------------------------------- table runner

def _job(key="mtlora", table="main_ablation", data: Path | None = None, **settings) -> Job:
    values = dict(model_name_or_path=LLAMA7B, num_gpus=1, results_dir=Path("/tmp/r"), bbh_dir=".", mmlu_dir=".",
                  use_cuda=True)
    values.update(settings)
    row = {r.key: r for r in TABLES[table].rows}[key]
    track = SCALES["paper"].tracks[0] if data is None else replace(SCALES["paper"].tracks[0], train_data=str(data))
    return Job(RunSettings(**values), SCALES["paper"], TABLES[table], track, row, 42)


def test_dry_run_jobs_are_their_own_runs(multitask_records):
    real, dry = _job(data=multitask_records), _job(data=multitask_records, dry_run=dry_run.DryRun(steps=5))
    assert dry.identity["dry_run"]["label"] == dry_run.LABEL and "dry_run" not in real.identity
    assert dry.run_dir.name.startswith("dryrun-mtlora-s42-") and dry.run_dir != real.run_dir
    assert dry.training["max_steps"] == 5 and "max_steps" not in real.training
    command = dry.training_command(dry.train_flags, dry.run_dir)
    assert "--random_init" in command and command[command.index("--tokenizer_name_or_path") + 1] == dry_run.DryRun.tokenizer
    assert "--random_init" in dry.evaluation_command(dry.run_dir, LLAMA7B)


def test_gpu_memory_sets_the_micro_batch_of_training_jobs():
    assert _job().micro_batch is None and _job().training["per_device_train_batch_size"] == 16
    small, large = _job(gpu_memory_gib=19.0), _job(gpu_memory_gib=79.0)
    assert large.training["per_device_train_batch_size"] == 16 and large.training["gradient_accumulation_steps"] == 2
    split = small.training["per_device_train_batch_size"], small.training["gradient_accumulation_steps"]
    assert split[0] < 16 and split[0] * split[1] == 32
    assert _job("task_arithmetic", "main_results", gpu_memory_gib=19.0).micro_batch is None  # nothing trained


def test_a_run_trained_at_another_split_is_reused_when_it_need_not_train_again(tmp_path, capsys, multitask_records):
    """A table resumed at another --gpu_memory_gb adopts the split of a run trained earlier: when it fits, or when its
    weights are there; a run that would train again at a split that does not fit is not reused, and it says so."""
    def trained(job: Job, weights: bool = False) -> Job:
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "train_summary.json").write_text("{}")
        for name in ("adapter_config.json", "adapter_model.safetensors") if weights else ():
            (job.run_dir / name).write_text("")
        return job

    earlier = trained(_job(data=multitask_records, gpu_memory_gib=19.0, results_dir=tmp_path / "a"))
    split = earlier.training["per_device_train_batch_size"]
    assert split < 16
    resumed = _job(data=multitask_records, gpu_memory_gib=79.0, results_dir=tmp_path / "a")  # plans 16 x 2; the 19 GiB split fits too
    assert resumed.run_dir == earlier.run_dir and resumed.training["per_device_train_batch_size"] == split
    assert f"reusing {earlier.run_dir.name}, trained at micro-batch {split} x {32 // split}" in capsys.readouterr().out

    large = trained(_job(data=multitask_records, gpu_memory_gib=79.0, results_dir=tmp_path / "b"))  # 16 x 2, no weights, nothing evaluated
    smaller = _job(data=multitask_records, gpu_memory_gib=19.0, results_dir=tmp_path / "b")
    assert smaller.run_dir != large.run_dir and smaller.training["per_device_train_batch_size"] == split
    assert f"not reusing {large.run_dir.name}" in capsys.readouterr().out

    from mtlora.experiments.runner import report_micro_batches

    seed_43 = replace(_job(data=multitask_records, gpu_memory_gib=79.0, results_dir=tmp_path / "a"), seed=43)
    report_micro_batches([resumed, seed_43], resumed.settings)  # s42 reuses its earlier split, s43 gets the plan's
    assert f"warning: mtlora (flan_bbh) has seeds at different micro-batch splits (16 x 2, {split} x {32 // split})" \
        in capsys.readouterr().out

    kept = trained(_job(data=multitask_records, gpu_memory_gib=79.0, results_dir=tmp_path / "c"), weights=True)
    assert _job(data=multitask_records, gpu_memory_gib=19.0, results_dir=tmp_path / "c").run_dir == kept.run_dir  # evaluation only
    assert _job(data=multitask_records, gpu_memory_gib=19.0, results_dir=tmp_path / "d").run_dir.name == smaller.run_dir.name


@pytest.fixture
def dry_run_setup(tmp_path, monkeypatch):
    bbh, mmlu = write_bbh_folder(tmp_path / "bbh"), write_mmlu_folder(tmp_path / "mmlu")
    tracks = (Track("flan_bbh", str(tmp_path / "missing_flan.jsonl"), ("bbh",), 500, 1.0, examples=64),)
    scale = replace(SCALES["paper"], name="tiny_paper", tracks=tracks, effective_batch_size=4,
                    training={**SCALES["paper"].training, "per_device_train_batch_size": 2, "max_seq_length": 48,
                              "bf16": False}, eval_batch_size=2)
    monkeypatch.setitem(registry.SCALES, "tiny_paper", scale)
    monkeypatch.setitem(TABLES, "main_ablation", replace(TABLES["main_ablation"], scales=("tiny_paper",)))
    return RunSettings(write_config_folder(tmp_path / "config"), 1, tmp_path / "results", str(bbh), str(mmlu), False,
                       seeds=(1, 2), dry_run=dry_run.DryRun(steps=4, warmup_steps=2, examples=32, eval_items=2))


@pytest.mark.slow
def test_run_table_dry_run_end_to_end(dry_run_setup):
    from mtlora.experiments.runner import run_table

    output = run_table("main_ablation", "tiny_paper", dry_run_setup, only_rows=["mtlora"], with_base=False)
    folder = dry_run_setup.results_dir / "tiny_paper"
    assert not (folder / "main_ablation.json").exists()  # never in the real table's place
    assert json.loads((folder / "main_ablation.dry_run.json").read_text())["dry_run"]["label"] == dry_run.LABEL
    (timing,) = output["dry_run"]["timings"]  # one seed: the second would time the same steps
    assert timing["s_per_step"] > 0 and timing["tokens_per_s"] > 0 and timing["bbh_questions_per_s"] > 0
    assert timing["full_steps"] == 16 and timing["projected_hours"] > 0  # 64 examples / effective batch 4
    markdown = (folder / "main_ablation.dry_run.md").read_text()
    assert "Dry run: timings only, accuracy meaningless" in markdown and "(2 seed(s) per trained row)" in markdown
    assert Path(output["per_seed"][0]["run_dir"]).name.startswith("dryrun-mtlora-s1-")


# ----------------------------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_paper_scale_benchmark_quick_run(tmp_path):
    from benchmarks import bench_paper_scale as bench

    bbh, mmlu = write_bbh_folder(tmp_path / "bbh"), write_mmlu_folder(tmp_path / "mmlu")
    out = tmp_path / "out"
    results = bench.main(["--quick", "--output_dir", str(out), "--bbh_dir", str(bbh), "--mmlu_dir", str(mmlu),
                          "--work_dir", str(tmp_path / "work"), "--only",
                          r"llama-2-7b: (base model evaluation|baseline|mtlora|mole|memory plan|baseline \(loop\))$|llama-2-13b: baseline$"])
    saved = json.loads((out / "paper_scale.json").read_text())
    assert saved["errors"] == {} and saved["skipped"] == []
    units = saved["units"]["llama-2-7b"]
    assert {"base", "baseline", "mtlora", "mole", "baseline (loop)"} <= set(units)
    assert units["mtlora"]["spectral_step_extra_s"] is not None and units["baseline"]["spectral_step_extra_s"] is None
    for name in ("baseline", "mtlora", "mole"):
        assert units[name]["s_per_step"] > 0 and set(units[name]["eval"]) == {"bbh", "mmlu"}
    assert set(saved["units"]["llama-2-13b"]) == {"baseline"}
    assert {(p["row"], p["checkpointing"]) for p in saved["memory"]} == {
        (r, c) for r in ("baseline", "mtlora") for c in (True, False)}
    markdown = (out / "PAPER_SCALE.md").read_text()
    assert dry_run.LABEL.capitalize() in markdown and "GPU memory -> micro-batch" in markdown
    assert bench.render(results) == markdown
