"""The shipped recipes (conf/recipe/): each composes and validates, asks for what its header says, and is refused
until it is pointed at a model and data; a recipe of one's own, kept outside the repository, extends one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TEST_DATA, compose, save_tiny_model
from sftdist.cli.check import check_inputs
from sftdist.model import activation_checkpointing

RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
GPUS_PER_NODE = 8  # what every recipe's header assumes, as slurm/sft.sh's #SBATCH --gpus-per-node does
SFTDIST_TRAIN = Path(sys.executable).parent / "sftdist-train"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    model = tmp_path_factory.mktemp("model")
    save_tiny_model(model)
    return f"model.name_or_path={model}", f"data.path={TEST_DATA / 'glaive_toolcall_40.json'}"


def test_there_are_recipes_for_one_node_several_nodes_and_a_70b_model():
    assert {"llama3.1-8b-fsdp2", "qwen2.5-7b-zero3", "llama3.1-70b-fsdp2"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_composes_validates_and_matches_its_header(recipe, inputs):
    cfg = compose(f"recipe={recipe}", *inputs)
    check_inputs(cfg)  # with a model and data, nothing is missing
    assert cfg.strategy.name == recipe.rsplit("-", 1)[1] and cfg.precision == "bf16"
    assert activation_checkpointing(cfg.model) == "full" and cfg.data.max_length <= cfg.train.micro_batch_tokens
    header = (REPO / "conf" / "recipe" / f"{recipe}.yaml").read_text()
    nodes = int(re.search(r"--nodes=(\d+)", header).group(1)) if "--nodes=" in header else 1
    assert f"recipe={recipe}" in header
    assert cfg.train.global_batch_size % (nodes * GPUS_PER_NODE) == 0  # every process gets whole samples
    # A stop's checkpoint fits in the time torchrun gives the workers, which fits in slurm/sft.sh's signal lead.
    shutdown = int(re.search(r"SHUTDOWN_TIMEOUT:-(\d+)", (REPO / "launch" / "torchrun.sh").read_text()).group(1))
    lead = int(re.search(r"--signal=B:USR1@(\d+)", (REPO / "slurm" / "sft.sh").read_text()).group(1))
    assert cfg.checkpoint.stop_timeout_s < shutdown < lead


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_is_refused_until_it_has_a_model_and_data(recipe):
    with pytest.raises(FileNotFoundError, match=r"data.path='/path/to/train.jsonl': no such file or directory"):
        check_inputs(compose(f"recipe={recipe}"))
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path='/path/to/.*': no such directory"):
        check_inputs(compose(f"recipe={recipe}", f"data.path={TEST_DATA / 'glaive_toolcall_40.json'}"))


def test_a_recipe_of_ones_own_outside_the_repository_extends_a_shipped_one(tmp_path, inputs):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - llama3.1-8b-fsdp2\n  - _self_\ntrain:\n  lr: 3.0e-6\n  max_steps: 500\n"
    )
    common = [str(SFTDIST_TRAIN), "--config-dir", str(tmp_path), "recipe=mine", *inputs]
    shown = subprocess.run([*common, "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "lr: 3.0e-06" in shown.stdout and "max_steps: 500" in shown.stdout and "name: fsdp2" in shown.stdout
    assert "max_length: 8192" in shown.stdout  # the rest from the shipped recipe
    checked = subprocess.run([*common, "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0 and "the config and its inputs are good" in checked.stdout, checked.stderr
