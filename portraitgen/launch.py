"""Start `portraitgen train` on every GPU of the allocation (docs/cluster.md).

    portraitgen launch-train --params params.yaml --out results/train      # one process per GPU here
    portraitgen launch-train --dry-run --params params.yaml                # print the command only
    srun --ntasks-per-node=1 portraitgen launch-train --params params.yaml # several nodes: one launcher each

The launcher takes the same flags as `portraitgen train` (and passes them on), reads how many GPUs
this node's allocation holds, and replaces itself with

    accelerate launch --multi_gpu --num_processes N ... -m portraitgen train <flags>

or, for a single process, with `portraitgen train <flags>`: on one GPU or none it runs exactly what
`portraitgen train` runs. Batch sizes in params are global, so the process count never changes what
is computed (docs/design.md §3); it only splits the work.

Where the numbers come from, first match wins:
- processes per node: `--num-processes` / PORTRAITGEN_NUM_PROCESSES, else one per GPU of this node:
  SLURM_GPUS_ON_NODE (set by SLURM for `--gpus*` / `--gres=gpu` jobs), else the entries of
  CUDA_VISIBLE_DEVICES, else torch's CUDA device count, else 1 (a CPU run);
- nodes: `--num-machines`, else the nodes of the `srun` step this launcher runs in
  (SLURM_STEP_NUM_NODES; the step must run one launcher per node), else 1; a multi-node job whose
  launcher is not inside such a step is an error (one launcher would leave the other nodes idle);
- machine rank: `--machine-rank`, else SLURM_NODEID;
- main process address: `--main-process-ip`, else MASTER_ADDR, else the first host of
  `scontrol show hostnames $SLURM_JOB_NODELIST`; port: `--main-process-port`, else MASTER_PORT, else
  derived from SLURM_JOB_ID on several nodes (every node computes the same one) or a free port.

`check_visible_gpus` is the matching startup check inside training: the number of CUDA devices a
process sees must equal the number of training processes on its node (LOCAL_WORLD_SIZE), so that no
GPU of the allocation idles and no two processes share one. It applies only where CUDA is available:
a CPU build of torch (the tests' fake SLURM GPU, File=/dev/null) trains on the CPU with a warning.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .hardware import add_hardware_arguments, train_flags

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torch.distributed's usual port, used when nothing else decides


class LaunchError(ValueError):
    """The allocation and the requested process layout do not fit together."""


class GPULayoutError(LaunchError):
    """A training process sees a different number of GPUs than there are processes on its node."""


# --------------------------------------------------------------------------------------------------
# Reading the allocation
# --------------------------------------------------------------------------------------------------
def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value.split("(")[0])  # SLURM writes e.g. "2(x2)" for per-node lists
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not a whole number") from None


def visible_device_list(value: str) -> list[str]:
    """The devices CUDA_VISIBLE_DEVICES exposes: CUDA stops at the first invalid entry ("-1", SLURM's
    "NoDevFiles"), and an empty value hides every device."""
    devices = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry in ("-1", "NoDevFiles"):
            break
        devices.append(entry)
    return devices


def _torch_cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_in_allocation(env: Mapping[str, str], cuda_device_count: Callable[[], int] | None = None
                       ) -> tuple[int, str]:
    """(GPUs this node's allocation holds, where that number came from)."""
    if (n := _int_env(env, "SLURM_GPUS_ON_NODE")) is not None:
        return n, f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']}"
    if "CUDA_VISIBLE_DEVICES" in env:
        return len(visible_device_list(env["CUDA_VISIBLE_DEVICES"])), \
            f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
    n = (cuda_device_count or _torch_cuda_device_count)()
    return n, f"torch.cuda.device_count()={n}"


def _scontrol_hostnames(nodelist: str) -> list[str]:
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def free_port() -> int:
    """A TCP port on the loopback address that was free a moment ago (for a rendezvous or a local server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Layout:
    """Where the training processes run."""

    processes_per_node: int  # training processes on each node (one per GPU)
    num_machines: int  # nodes taking part
    machine_rank: int  # this node's index, 0 .. num_machines - 1
    gpus_per_node: int  # GPUs the allocation holds on this node (0: a CPU run)
    gpu_source: str  # where gpus_per_node was read
    main_address: str | None = None  # host of process 0 (several nodes only)
    main_port: int = DEFAULT_PORT

    @property
    def num_processes(self) -> int:
        return self.processes_per_node * self.num_machines

    def describe(self) -> str:
        where = (f"{self.num_machines} nodes, this one rank {self.machine_rank}, main "
                 f"{self.main_address}:{self.main_port}" if self.num_machines > 1 else "1 node")
        gpus = f"{self.gpus_per_node} GPUs per node ({self.gpu_source})" if self.gpus_per_node else \
            f"no GPU ({self.gpu_source}): CPU processes"
        n = self.processes_per_node
        return f"{n} process{'es' if n != 1 else ''} per node x {where}; {gpus}"


def plan_launch(env: Mapping[str, str] | None = None, *, num_processes: int = 0, num_machines: int = 0,
                machine_rank: int | None = None, main_process_ip: str | None = None, main_process_port: int = 0,
                cuda_device_count: Callable[[], int] | None = None,
                hostnames: Callable[[str], list[str]] = _scontrol_hostnames) -> Layout:
    """The process layout for this node, from the flags and the allocation's environment."""
    env = os.environ if env is None else env
    gpus, source = gpus_in_allocation(env, cuda_device_count)
    if num_processes < 0 or num_machines < 0:
        raise LaunchError("--num-processes and --num-machines must be >= 0 (0: from the allocation)")
    if num_processes and gpus and num_processes != gpus:
        raise LaunchError(f"--num-processes {num_processes}, but this node's allocation holds {gpus} GPUs "
                          f"({source}): training runs one process per GPU. Leave --num-processes out, or "
                          f"ask SLURM for {num_processes} GPUs (e.g. `train: {{gpu: {num_processes}}}` in the SLURM profile)")
    per_node = num_processes or max(gpus, 1)

    job_nodes = _int_env(env, "SLURM_JOB_NUM_NODES") or _int_env(env, "SLURM_NNODES") or 1
    step_nodes = _int_env(env, "SLURM_STEP_NUM_NODES")
    recipe = ("start one launcher per node: `srun --ntasks-per-node=1 portraitgen launch-train ...` "
              "(docs/cluster.md), or pass --num-machines 1 to train on this node alone")
    if num_machines:
        nodes = num_machines
    elif step_nodes is not None:
        nodes = step_nodes
        step_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or 1
        if step_tasks != step_nodes:
            raise LaunchError(f"this srun step runs {step_tasks} tasks on {step_nodes} nodes; the launcher "
                              f"must run once per node: {recipe}")
        if step_nodes < job_nodes:
            raise LaunchError(f"the job holds {job_nodes} nodes but this srun step only {step_nodes}; {recipe}")
    elif job_nodes > 1:
        raise LaunchError(f"the job holds {job_nodes} nodes but this launcher is not inside an srun step "
                          f"across them; {recipe}")
    else:
        nodes = 1

    if machine_rank is not None:
        rank = machine_rank
    else:
        rank = (_int_env(env, "SLURM_NODEID") or 0) if nodes > 1 else 0
    if not 0 <= rank < nodes:
        raise LaunchError(f"machine rank {rank} is outside 0..{nodes - 1}")

    address = None
    if nodes > 1:
        address = main_process_ip or env.get("MASTER_ADDR")
        if not address:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise LaunchError(f"{nodes} nodes but no main process address: pass --main-process-ip "
                                  f"(or MASTER_ADDR), or run inside a SLURM job")
            address = hostnames(nodelist)[0]
    port = main_process_port or _int_env(env, "MASTER_PORT") or 0
    if not port and per_node * nodes == 1:
        port = DEFAULT_PORT  # unused: a single process starts no process group
    elif not port:
        job_id = _int_env(env, "SLURM_JOB_ID")
        if nodes > 1:
            # Every node must pick the same port without talking to the others.
            port = 20000 + job_id % 20000 if job_id is not None else DEFAULT_PORT
        else:
            port = free_port()  # two single-node jobs sharing a machine must not collide
    return Layout(per_node, nodes, rank, gpus, source, address, port)


def train_command(layout: Layout, train_args: list[str], python: str = sys.executable) -> list[str]:
    """The command that runs `portraitgen train <train_args>` with `layout`."""
    if layout.num_processes == 1:
        return [python, "-m", "portraitgen", "train", *train_args]
    # --multi_gpu also starts several CPU processes (a gloo group) when there is no GPU (README).
    cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(layout.num_processes),  # Accelerate counts processes over all nodes
           "--num_machines", str(layout.num_machines), "--machine_rank", str(layout.machine_rank),
           "--main_process_port", str(layout.main_port)]
    if layout.num_machines > 1:
        cmd += ["--main_process_ip", layout.main_address]
    # Precision comes from the trainer's own --mixed-precision flag; this only silences Accelerate's
    # "not set, defaulting" warnings.
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "portraitgen", "train", *train_args]
    return cmd


# --------------------------------------------------------------------------------------------------
# The startup check inside training
# --------------------------------------------------------------------------------------------------
def check_visible_gpus(local_processes: int | None = None, visible: int | None = None,
                       env: Mapping[str, str] | None = None) -> int:
    """Fail when this process sees a different number of CUDA devices than there are training processes
    on its node; returns the number of visible devices.

    local_processes: training processes on this node (default: LOCAL_WORLD_SIZE, which `accelerate
    launch`/torchrun set, else 1). visible: CUDA devices this process sees (default: torch's count, 0
    without CUDA). Without CUDA the check only warns when the allocation claims GPUs (a CPU build of
    torch, a broken driver, or the tests' fake SLURM GPU): training then runs on the CPU.
    """
    env = os.environ if env is None else env
    if local_processes is None:
        local_processes = _int_env(env, "LOCAL_WORLD_SIZE") or 1
    if visible is None:
        visible = _torch_cuda_device_count()
    if visible == 0:
        allocated, source = gpus_in_allocation(env, cuda_device_count=lambda: 0)
        if allocated:
            log.warning("the allocation holds %d GPUs (%s) but torch sees no CUDA device: training runs on "
                        "the CPU", allocated, source)
        return 0
    if visible != local_processes:
        devices = env.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={devices!r})" if devices is not None else ""
        raise GPULayoutError(
            f"{visible} GPUs are visible to each training process{shown} but {local_processes} training "
            f"process{'es run' if local_processes != 1 else ' runs'} on this node: training runs one process "
            f"per GPU. Start it with `portraitgen launch-train` (one process per GPU of the allocation), "
            f"or make CUDA_VISIBLE_DEVICES list {local_processes} GPU{'s' if local_processes != 1 else ''}")
    return visible


# --------------------------------------------------------------------------------------------------
# The `portraitgen launch-train` command
# --------------------------------------------------------------------------------------------------
TRAIN_FLAGS = ("params", "out")  # passed on when given; the Hardware flags too (portraitgen/hardware.py)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `portraitgen launch-train`: train's own flags (passed on when given) + the layout."""
    train = parser.add_argument_group("passed on to `portraitgen train` (see `portraitgen train --help`)")
    train.add_argument("--params", help="params file (train's default: params.yaml)")
    train.add_argument("--out", help="output folder (train's default: results/train)")
    add_hardware_arguments(train, pass_through=True)
    lay = parser.add_argument_group("process layout (default: from the allocation)")
    lay.add_argument("--num-processes", type=int, default=int(os.environ.get("PORTRAITGEN_NUM_PROCESSES", 0)),
                     help="training processes per node; 0 = one per GPU of this node's allocation, 1 without "
                          "GPUs. Env: PORTRAITGEN_NUM_PROCESSES")
    lay.add_argument("--num-machines", type=int, default=0,
                     help="nodes; 0 = the nodes of the srun step this runs in (1 outside SLURM)")
    lay.add_argument("--machine-rank", type=int, help="this node's rank (default: SLURM_NODEID)")
    lay.add_argument("--main-process-ip", help="address of the node of process 0 (several nodes; default: "
                                               "MASTER_ADDR, else the first host of the SLURM job)")
    lay.add_argument("--main-process-port", type=int, default=0,
                     help="port of process 0 (default: MASTER_PORT, else from SLURM_JOB_ID / a free port)")
    parser.add_argument("--dry-run", action="store_true", help="print the layout and the command, run nothing")


def _train_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + train_flags(args)


def cmd_launch_train(args: argparse.Namespace) -> int:
    try:
        layout = plan_launch(num_processes=args.num_processes, num_machines=args.num_machines,
                             machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                             main_process_port=args.main_process_port)
    except LaunchError as exc:
        print(f"portraitgen launch-train: error: {exc}", file=sys.stderr)
        return 2
    cmd = train_command(layout, _train_args(args))
    log.info("launch-train: %s", layout.describe())
    log.info("launch-train: %s", shlex.join(cmd))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: signals from SLURM (scancel, time limit) reach the trainer directly.
    os.execv(cmd[0], cmd)
    return 0  # not reached
