"""Distributed training on CPU with gloo and real torch.distributed processes: DDP, FSDP2 and DeepSpeed
ZeRO-3 against one process. The scenarios run in one torchrun launch (tests/distributed/scenarios.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    REPO,
    adapter_weights,
    bitwise_equal,
    compose,
    drop_steps,
    final_weights,
    fit_and_close,
    max_relative_difference,
    poison_steps,
    read_metrics,
)
from launching import free_port, load_scenarios, scenario_ok, torchrun_env
from sftdist.errors import ConfigError
from sftdist.run.layout import MARKER
from sftdist.training import Trainer

scenarios = load_scenarios()


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("strategy", scenarios.STRATEGIES)
def test_one_step_gradients_equal_the_single_process_full_batch(launched, strategy, packing):
    result = scenario_ok(launched[2][f"grads/{strategy}/{packing}"])
    ranks = result["ranks"]
    assert result["supervised_tokens"] == result["ref_supervised"] == sum(r["supervised"] for r in ranks)
    assert len({r["micro_batches"] for r in ranks}) == 1  # the same number of micro-steps on every rank
    assert max(r["micro_batches"] for r in ranks) >= 2  # accumulation over micro-batches...
    # ...with deliberately uneven token counts, where normalising per rank or per micro-batch would be wrong:
    if packing:  # full rows dealt unevenly (3 rows, 2 ranks): one rank runs an empty micro-batch
        low, high = sorted(r["supervised"] for r in ranks)
        assert high > 1.3 * low and any(r["real"] < r["micro_batches"] for r in ranks)
    else:  # padded micro-batches of very different fill
        real = [n for r in ranks for n in r["per_micro_batch"]]
        assert max(real) > 1.3 * min(real)
    assert result["max_rel"] < 1e-5  # FACTS: one step agrees to summation order (measured ~5e-7)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("strategy", scenarios.STRATEGIES)
def test_three_steps_on_two_processes_give_the_weights_of_one(launched, single_process, strategy, packing):
    result = scenario_ok(launched[2][f"fit/{strategy}/{packing}"])
    run, reference = Path(result["output_dir"]), single_process[True]  # one process, packed: the reference
    weights = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(reference / "final" / "model.safetensors"))
    # FACTS (3 AdamW steps, uneven samples): DDP 6.4e-6, FSDP2 1.3e-5, ZeRO-3 3.7e-5 from summation order;
    # wrong normalisations 2.2e-2 (per rank) and 7.4e-2 (per micro-batch).
    difference = max_relative_difference(weights, expected)
    print(f"{strategy} packing={packing}: max per-tensor relative weight difference {difference:.2e}")
    assert difference < 1e-4
    ours, theirs = read_metrics(run), read_metrics(reference)
    assert [m["train/supervised_tokens"] for m in ours] == [m["train/supervised_tokens"] for m in theirs]
    for a, b in zip(ours, theirs):  # the logged loss is the true token mean of the step
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert not (run / "final" / "metrics.jsonl").exists() and len(ours) == 3  # rank 0 alone writes


@pytest.mark.parametrize("strategy", scenarios.STRATEGIES)
def test_lora_adapters_after_three_steps_on_two_processes_equal_one_process(launched, single_lora, strategy):
    result = scenario_ok(launched[2][f"lora/{strategy}"])
    run = Path(result["output_dir"])
    difference = max_relative_difference(adapter_weights(run), adapter_weights(single_lora))
    print(f"{strategy} LoRA: max per-tensor relative adapter difference {difference:.2e}")
    assert difference < 1e-4  # the invariance tolerance (FACTS)
    for a, b in zip(read_metrics(run), read_metrics(single_lora), strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    # The merged exports agree too, and differ from the base by the adapters' update only.
    merged, expected = (load_file(str(r / "final_merged" / "model.safetensors")) for r in (run, single_lora))
    assert max_relative_difference(merged, expected) < 1e-4
    lora_b = [v for k, v in adapter_weights(run).items() if ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # (B starts at zero: the adapters trained)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_the_chunked_loss_gives_the_naive_loss_weights_on_two_processes(launched, strategy):
    """The output head's weight is sharded under both: the chunked loss runs where the strategy has gathered it."""
    chunked, naive = (
        scenario_ok(launched[2][f"fit/{strategy}/True"]),
        scenario_ok(launched[2][f"naive_loss/{strategy}"]),
    )
    assert (chunked["loss_impl"], naive["loss_impl"]) == ("chunked", "naive")
    difference = max_relative_difference(final_weights(chunked["output_dir"]), final_weights(naive["output_dir"]))
    print(f"{strategy}: chunked vs naive loss, max per-tensor relative weight difference {difference:.2e}")
    assert difference < 1e-4  # the invariance tolerance (FACTS: ZeRO-3 3.7e-5 from summation order alone)
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-6)


def test_fsdp2_reducing_gradients_once_per_step_gives_the_weights_of_one_process(launched, single_process):
    result = scenario_ok(launched[2]["grad_sync_last/fsdp2"])
    difference = max_relative_difference(final_weights(result["output_dir"]), final_weights(single_process[True]))
    assert difference < 1e-4


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_strategies_load_a_checkpoint_exactly_without_a_whole_model_per_rank(launched, strategy):
    out, _, results = launched
    result = scenario_ok(results[f"load/{strategy}"])
    assert not [m for m in result["logged"] if "building the whole model on CPU" in m]  # read from the files
    loaded = torch.load(out / f"load-{strategy}.pt")
    saved = load_file(str(out / "tied-bf16" / "model.safetensors"))  # bf16, lm_head tied: not in the file
    assert set(saved) <= set(loaded) <= set(saved) | {"lm_head.weight"}
    for name, tensor in saved.items():  # fp32 masters of the bf16 checkpoint, bit for bit
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor.float()), name
    if "lm_head.weight" in loaded:
        assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])


def test_bf16_sharded_strategies_agree_and_export_the_fp32_masters(launched):
    fsdp2, zero3 = scenario_ok(launched[2]["bf16/fsdp2"]), scenario_ok(launched[2]["bf16/zero3"])
    a = load_file(str(Path(fsdp2["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(zero3["output_dir"]) / "final" / "model.safetensors"))
    # Both reduce and accumulate gradients in fp32; the bf16 compute differs only in where it rounds.
    assert max_relative_difference(b, a) < 1e-2
    assert zero3["loss"] == pytest.approx(fsdp2["loss"], rel=1e-2)
    for weights in (a, b):  # the exported tiny model is fp32 masters, not bf16 compute copies
        assert all(w.dtype == torch.float32 for w in weights.values())
        assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in weights.values())


def test_a_global_batch_the_world_cannot_share_is_refused(launched):
    result = scenario_ok(launched[2]["bad_global_batch"])
    assert result["message"] == (
        "train.global_batch_size=3 is not divisible by the 2 processes (world size): make it a multiple of 2"
    )
    assert result["wrote"] is False


def test_when_rank_0_stops_on_bad_data_the_others_stop_too(launched):
    first, second = scenario_ok(launched[2]["bad_data_on_rank_0"])["messages"]
    assert first.startswith("DataError: 5 of 6 records (83.3%) were rejected")
    assert second == "DataError: rank 0 stopped while preparing the data (its error says why); stopping too"


def test_zero3_without_deepspeed_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without it does on import
    with pytest.raises(ConfigError, match=r"strategy=zero3 needs DeepSpeed.*pip install 'sftdist\[deepspeed\]'"):
        Trainer(compose("strategy=zero3", f"output_dir={tmp_path / 'run'}", "wandb.mode=disabled"))
    assert not (tmp_path / "run").exists()


def test_two_nodes_rehearsed_on_localhost_train_and_export(launched, single_process, tmp_path):
    """Two torchrun agents (two "nodes" of one process each) meet through the c10d rendezvous, the way
    launch/torchrun.sh starts them on a Slurm allocation, and train the same model as one process."""
    out, data, _ = launched
    env = torchrun_env(
        NNODES="2",
        NPROC_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RDZV_ID="rehearsal",
        PYTHON=sys.executable,
    )
    args = [
        str(REPO / "launch" / "torchrun.sh"),
        *scenarios.common(out, data),
        "strategy=fsdp2",
        f"output_dir={tmp_path / 'run'}",
    ]
    agents = [  # started in the repository root, as sbatch slurm/sft.sh starts it from a checkout
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-4000:]
    assert "2 node(s) x 1 process(es)" in outputs[0][1]
    assert "fsdp2 x 2" in "".join(o + e for o, e in outputs)
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    expected = load_file(str(single_process[True] / "final" / "model.safetensors"))
    assert max_relative_difference(weights, expected) < 1e-4
    assert torch.equal(torch.tensor([m["step"] for m in read_metrics(tmp_path / "run")]), torch.tensor([1, 2, 3]))


def _probe_rows(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "probes.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_probes(launched, tmp_path_factory):
    """The probe scenarios' run on one process: what both strategies' evals must equal."""
    run = tmp_path_factory.mktemp("single-probes")
    fit_and_close(Trainer(compose(*scenarios.probe_settings(launched[0]), f"output_dir={run}")))
    return run


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_evals_on_two_processes_equal_one_whatever_the_answer_lengths(launched, strategy, single_probes):
    """Probes in batches of 2: rank 0's first answers stop early, rank 1's run ~5x longer, and in the last round
    rank 1 has no batch: no rank hangs, and the answers and metrics are those of one process; the held-out loss per
    source and the extra eval set's loss too."""
    _, _, results = launched
    result = scenario_ok(results[f"probes/{strategy}"])
    ours, theirs = _probe_rows(result["output_dir"]), _probe_rows(single_probes)
    before = {r["id"]: r["tokens"] for r in theirs if r["step"] == 0}
    assert max(before["long-0"], before["long-1"]) >= 3 * max(before["short-0"], before["short-1"]), before  # uneven
    strip = ("step", "id", "response", "tokens", "stopped", "checks")
    assert [{k: r[k] for k in strip} for r in ours if r["step"] == 0] == [
        {k: r[k] for k in strip} for r in theirs if r["step"] == 0
    ]  # the same weights before training: the same answers, token for token
    (a,) = [m for m in read_metrics(result["output_dir"], baseline=True) if m["step"] == 0]
    (b,) = [m for m in read_metrics(single_probes, baseline=True) if m["step"] == 0]
    losses = ["eval/loss", "eval/loss/uneven", "eval/loss/demo", "eval/extra/loss"]
    assert {k: a[k] for k in losses} == pytest.approx({k: b[k] for k in losses}, rel=1e-5)  # summed in another order
    assert a["eval/loss/uneven"] != pytest.approx(a["eval/loss/demo"], rel=1e-2)  # two different sets, not mixed up
    probe_keys = [k for k in b if k.startswith("eval/") and "loss" not in k]
    assert probe_keys and {k: a[k] for k in probe_keys} == {k: b[k] for k in probe_keys}
    assert {r["step"] for r in ours} == {0, 1}  # and again after the step (the last one)


@pytest.fixture(scope="module")
def never_trained_that_step(launched, tmp_path_factory):
    """One process, the skip scenarios' run, with the left-out step's batch never trained on."""
    out, data, _ = launched
    run = tmp_path_factory.mktemp("single-dropped")
    trainer = Trainer(compose(*scenarios.common(out, data), *scenarios.SKIP, f"output_dir={run}"))
    drop_steps(trainer, {scenarios.SKIPPED_STEP})
    fit_and_close(trainer)
    return run


@pytest.mark.parametrize("strategy", ["none", *scenarios.STRATEGIES])
def test_a_non_finite_step_is_left_out_on_every_rank(launched, never_trained_that_step, strategy, tmp_path):
    """The second of 4 steps NaN (on rank 0 only): no rank applies it, it is counted, and the weights are those of
    a run whose stream never held that batch (bitwise on one process; to summation order on two)."""
    out, data, results = launched
    if strategy == "none":
        run = tmp_path / "run"
        trainer = Trainer(compose(*scenarios.common(out, data), *scenarios.SKIP, f"output_dir={run}"))
        poison_steps(trainer, {scenarios.SKIPPED_STEP})
        fit_and_close(trainer)
    else:
        run = Path(scenario_ok(results[f"skip/{strategy}"])["output_dir"])
    metrics = read_metrics(run)
    assert [m["train/skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert math.isnan(metrics[1]["train/loss"]) and not math.isfinite(metrics[1]["train/grad_norm"])
    weights = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(never_trained_that_step / "final" / "model.safetensors"))
    if strategy == "none":
        assert bitwise_equal(weights, expected)
    else:
        assert max_relative_difference(weights, expected) < 1e-4  # as the 3-step fits (FACTS)


def test_too_many_non_finite_steps_stop_every_rank_with_a_checkpoint(launched):
    result = scenario_ok(launched[2]["diverged/zero3"])
    checkpoint = Path(result["output_dir"]) / "checkpoints" / "step_2"
    assert (
        result["messages"]
        == [
            "DivergedError: steps 1 to 2: the loss or the gradient norm is not finite, 2 in a row "
            f"(train.skip_nonfinite_steps=1); {checkpoint} holds the weights of step 0; lower train.lr, or check "
            "the data and precision"
        ]
        * 2
    )
    assert (checkpoint / MARKER).is_file() and not (Path(result["output_dir"]) / "final").exists()


def test_context_parallel_attention_equals_the_whole_rows(launched):
    """fp64, 2 ranks: every output and q, k, v gradient of a rank's shard equals the unsharded packed attention's,
    with samples across shard boundaries, a sliding window, GQA, and a rank holding no real token."""
    assert scenario_ok(launched[2]["cp_attention"])["max_abs"] < 1e-12


@pytest.mark.parametrize("strategy", scenarios.STRATEGIES)
def test_context_parallel_gives_the_weights_of_one_process(launched, single_process, strategy):
    """strategy.context_parallel=2 on 2 processes (each packed row split over both): 3 steps end where one process
    ends, the logged loss and supervised tokens are the step's, as without context parallelism."""
    run = Path(scenario_ok(launched[2][f"cp/{strategy}"])["output_dir"])
    reference = single_process[True]
    weights = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(reference / "final" / "model.safetensors"))
    assert max_relative_difference(weights, expected) < 1e-4  # as the data-parallel fits (FACTS)
    ours, theirs = read_metrics(run), read_metrics(reference)
    assert [m["train/supervised_tokens"] for m in ours] == [m["train/supervised_tokens"] for m in theirs]
    for a, b in zip(ours, theirs):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert 0 < a["train/budget_fill"] <= 1 and a["train/padding_fraction"] < 0.2  # (the pads of the shards)
