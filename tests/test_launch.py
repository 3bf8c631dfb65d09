"""`portraitgen launch-train`: the process layout read from the allocation, and the GPU startup check.

Layouts are planned from explicit environment mappings (no GPU, no SLURM needed); one slow test runs
the launcher for real with two CPU processes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from helpers import write_params
from portraitgen.cli import main
from portraitgen.launch import (GPULayoutError, LaunchError, check_visible_gpus, gpus_in_allocation, plan_launch,
                                train_command, visible_device_list)
from portraitgen.policies import tiny_model_path

NO_CUDA = lambda: 0  # noqa: E731 - stands in for torch.cuda.device_count() on a machine without GPUs
PY = "/venv/bin/python"


def plan(env: dict[str, str], **kw):
    return plan_launch(env, cuda_device_count=kw.pop("cuda", NO_CUDA), **kw)


# --------------------------------------------------------------------------------------------------
# How many GPUs the allocation holds
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, 4),  # SLURM's count first
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5b1c,GPU-9e2f"}, 2),  # UUIDs count like indices
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),  # hides every device
    ({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}, 2),  # CUDA stops at the first invalid entry
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),  # what SLURM writes for a job without GPUs
    ({"SLURM_GPUS_ON_NODE": "0"}, 0),
    ({}, 0),  # nothing in the environment: torch's count (here none)
])
def test_gpus_in_allocation(env, expected):
    assert gpus_in_allocation(env, NO_CUDA)[0] == expected


def test_without_allocation_variables_torch_counts_the_gpus():
    n, source = gpus_in_allocation({}, lambda: 8)
    assert n == 8 and source == "torch.cuda.device_count()=8"
    assert visible_device_list(" 3, 5 ") == ["3", "5"]


def test_a_malformed_count_names_the_variable():
    with pytest.raises(LaunchError, match="SLURM_GPUS_ON_NODE='two'"):
        gpus_in_allocation({"SLURM_GPUS_ON_NODE": "two"}, NO_CUDA)


# --------------------------------------------------------------------------------------------------
# Process count and the command
# --------------------------------------------------------------------------------------------------
def test_no_gpu_runs_one_plain_train_process():
    layout = plan({})
    assert (layout.processes_per_node, layout.num_machines, layout.num_processes) == (1, 1, 1)
    assert train_command(layout, ["--params", "p.yaml"], python=PY) == \
        [PY, "-m", "portraitgen", "train", "--params", "p.yaml"]


def test_one_gpu_runs_one_plain_train_process():
    layout = plan({"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"})
    assert train_command(layout, [], python=PY) == [PY, "-m", "portraitgen", "train"]


def test_one_process_per_gpu_of_the_allocation():
    layout = plan({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_NUM_NODES": "1",
                   "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "77"})
    assert (layout.processes_per_node, layout.num_processes, layout.gpus_per_node) == (4, 4, 4)
    assert "SLURM_GPUS_ON_NODE=4" in layout.describe()
    cmd = train_command(layout, ["--params", "p.yaml", "--out", "results/train"], python=PY)
    assert cmd[:3] == [PY, "-m", "accelerate.commands.launch"]
    flags = cmd[3:cmd.index("-m", 3)]
    assert flags[0] == "--multi_gpu"
    opts = dict(zip(flags[1::2], flags[2::2]))
    assert opts["--num_processes"] == "4" and opts["--num_machines"] == "1" and opts["--machine_rank"] == "0"
    assert "--main_process_ip" not in opts
    assert cmd[cmd.index("-m", 3):] == ["-m", "portraitgen", "train", "--params", "p.yaml", "--out", "results/train"]


def test_num_processes_must_match_the_allocations_gpus():
    with pytest.raises(LaunchError) as err:
        plan({"SLURM_GPUS_ON_NODE": "4"}, num_processes=2)
    msg = str(err.value)
    assert "--num-processes 2" in msg and "holds 4 GPUs" in msg and "SLURM_GPUS_ON_NODE=4" in msg
    assert plan({"SLURM_GPUS_ON_NODE": "4"}, num_processes=4).num_processes == 4


def test_num_processes_on_a_cpu_machine_starts_cpu_processes():
    layout = plan({}, num_processes=2)
    assert layout.num_processes == 2 and layout.gpus_per_node == 0
    assert "--num_processes" in train_command(layout, [])
    assert 1024 <= layout.main_port < 65536  # a free port: two runs on one machine do not collide


def test_explicit_and_env_main_port():
    assert plan({}, num_processes=2, main_process_port=29600).main_port == 29600
    assert plan({"MASTER_PORT": "29700"}, num_processes=2).main_port == 29700


# --------------------------------------------------------------------------------------------------
# Several nodes
# --------------------------------------------------------------------------------------------------
def _node_env(rank: int) -> dict[str, str]:
    """The environment of `srun --ntasks-per-node=1` in a 2-node job with 8 GPUs per node."""
    return {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": str(rank),
            "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_multi_node_layout_from_the_srun_step():
    asked = []

    def hostnames(nodelist):
        asked.append(nodelist)
        return ["gpu07", "gpu08"]

    layouts = [plan(_node_env(rank), hostnames=hostnames) for rank in (0, 1)]
    assert asked == ["gpu[07-08]", "gpu[07-08]"]
    for rank, layout in enumerate(layouts):
        assert (layout.processes_per_node, layout.num_machines, layout.machine_rank) == (8, 2, rank)
        assert layout.num_processes == 16
    # Every node derives the same main address and port on its own.
    assert {(lay.main_address, lay.main_port) for lay in layouts} == {("gpu07", 20000 + 123456 % 20000)}
    cmd = train_command(layouts[1], ["--params", "p.yaml"], python=PY)
    opts = dict(zip(cmd[4:cmd.index("-m", 3):2], cmd[5:cmd.index("-m", 3):2]))
    assert opts == {"--num_processes": "16", "--num_machines": "2", "--machine_rank": "1",
                    "--main_process_port": "23456", "--main_process_ip": "gpu07",
                    "--mixed_precision": "no", "--dynamo_backend": "no"}


def test_multi_node_main_address_from_flags_or_master_addr():
    env = _node_env(0)
    assert plan(env, main_process_ip="10.0.0.5", hostnames=pytest.fail).main_address == "10.0.0.5"
    assert plan({**env, "MASTER_ADDR": "10.0.0.6"}, hostnames=pytest.fail).main_address == "10.0.0.6"


@pytest.mark.parametrize("env, why", [
    # sbatch --nodes=2 with the launcher in the batch script itself: node 2 would idle.
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}, "not inside an srun step"),
    # srun without --ntasks-per-node=1: several launchers on one node.
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16"}, "16 tasks on 2 nodes"),
    # A one-node step in a two-node job (e.g. Snakemake's `srun -n1` job step).
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1"}, "this srun step only 1"),
])
def test_multi_node_jobs_need_one_launcher_per_node(env, why):
    with pytest.raises(LaunchError) as err:
        plan(env)
    assert why in str(err.value) and "srun --ntasks-per-node=1" in str(err.value)
    assert plan(env, num_machines=1).num_machines == 1  # the explicit way out: this node alone


def test_machine_rank_must_fit():
    with pytest.raises(LaunchError, match="machine rank 2 is outside 0..1"):
        plan(_node_env(0), machine_rank=2, hostnames=lambda nl: ["a", "b"])


# --------------------------------------------------------------------------------------------------
# The startup check in training
# --------------------------------------------------------------------------------------------------
def test_check_passes_when_each_node_runs_one_process_per_visible_gpu():
    assert check_visible_gpus(visible=4, env={"LOCAL_WORLD_SIZE": "4"}) == 4
    assert check_visible_gpus(local_processes=2, visible=2, env={}) == 2
    assert check_visible_gpus(visible=1, env={}) == 1  # plain `portraitgen train` on one GPU


@pytest.mark.parametrize("visible, env, processes", [
    (4, {"LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "2 training processes run"),  # GPUs idle
    (2, {"LOCAL_WORLD_SIZE": "4"}, "4 training processes run"),  # processes would share a GPU
    (8, {}, "1 training process runs"),  # `portraitgen train` alone on an 8-GPU node
])
def test_check_fails_on_a_mismatch_with_a_clear_message(visible, env, processes):
    with pytest.raises(GPULayoutError) as err:
        check_visible_gpus(visible=visible, env=env)
    msg = str(err.value)
    assert f"{visible} GPUs are visible" in msg and processes in msg and "portraitgen launch-train" in msg
    if "CUDA_VISIBLE_DEVICES" in env:
        assert "CUDA_VISIBLE_DEVICES='0,1,2,3'" in msg


def test_check_without_cuda_trains_on_cpu_and_warns_when_the_allocation_has_gpus(caplog):
    """The SLURM test's fake GPU (File=/dev/null): CUDA_VISIBLE_DEVICES=0, torch sees nothing."""
    with caplog.at_level(logging.WARNING, logger="portraitgen.launch"):
        assert check_visible_gpus(visible=0, env={"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0",
                                                  "LOCAL_WORLD_SIZE": "1"}) == 0
    assert "torch sees no CUDA device: training runs on the CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="portraitgen.launch"):
        assert check_visible_gpus(visible=0, env={"LOCAL_WORLD_SIZE": "2"}) == 0  # CPU processes (gloo)
    assert caplog.text == ""
    assert check_visible_gpus() == 0  # this machine: torch without CUDA


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT",
                                                 "LOCAL_WORLD_SIZE", "PORTRAITGEN_NUM_PROCESSES"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_cli_dry_run_prints_the_command_and_passes_train_flags_on(clean_env, capsys):
    clean_env.setenv("SLURM_GPUS_ON_NODE", "2")
    assert main(["launch-train", "--dry-run", "--params", "p.yaml", "--micro-batch-size", "4",
                 "--mixed-precision", "bf16"]) == 0
    out = capsys.readouterr().out.strip()
    assert " -m accelerate.commands.launch --multi_gpu --num_processes 2 " in out
    assert out.endswith("-m portraitgen train --params p.yaml --micro-batch-size 4 --mixed-precision bf16")


def test_cli_reports_a_layout_error_and_exits_2(clean_env, capsys):
    clean_env.setenv("SLURM_GPUS_ON_NODE", "4")
    clean_env.setenv("PORTRAITGEN_NUM_PROCESSES", "3")
    assert main(["launch-train", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "portraitgen launch-train: error: --num-processes 3, but this node's allocation holds 4 GPUs" in err


@pytest.mark.slow
def test_launch_train_runs_two_cpu_processes(tmp_path):
    """The real thing: the launcher replaces itself with `accelerate launch` and trains on 2 processes."""
    tiny_model_path("sd3")  # build it once here, before two processes race for it
    params = write_params(tmp_path / "params.yaml", **{"train.iterations": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run([sys.executable, "-m", "portraitgen", "launch-train", "--num-processes", "2",
                           "--params", str(params), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes per node x 1 node; no GPU" in proc.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["processes"] == 2


def test_hardware_switches_are_passed_on_to_train(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["launch-train", "--dry-run", "--params", "p.yaml", "--micro-batch-size", "2",
                 "--rollout-batch-size", "8", "--compile", "--gradient-checkpointing"]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert command.endswith("-m portraitgen train --params p.yaml --micro-batch-size 2 --rollout-batch-size 8"
                            " --compile 1 --gradient-checkpointing 1")
