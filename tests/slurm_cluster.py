"""A throwaway single-node SLURM cluster for tests (docs/cluster.md).

    with SlurmCluster.start(partitions=["cpu", "gpu"], gpus=1) as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env())

`start` installs the Debian packages when SLURM is missing and that is possible (root, apt-get),
writes `slurm.conf`/`gres.conf` into a fresh temporary folder (nothing under /etc is touched), starts
`slurmctld` and `slurmd` on free ports, and waits until the node is idle; leaving the `with` block
cancels every job, shuts the daemons down and waits for their pids. Whatever stops the cluster from
starting raises `SlurmUnavailable` with the reason (tests turn it into a skip).

Two facts of this setup shape the code:
- Client commands find this cluster through `SLURM_CONF`. The Snakemake jobstep plugin removes
  `SLURM_CONF` (with every other `SLURM_*` variable) from the environment of the `srun` it runs inside
  each job, which then fails with "Could not establish a configuration source". `env()` therefore
  puts a folder first on PATH whose `srun` is a wrapper that sets `SLURM_CONF` again; jobs inherit
  PATH (`sbatch --export=ALL`).
- The GPU is fake: `gres.conf` declares `gpu` with `File=/dev/null`, so `--gpus=1` jobs are
  scheduled and see `CUDA_VISIBLE_DEVICES=0`, while torch (CPU build) sees no CUDA device.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Device files that stand in for GPUs, one per fake GPU (slurmd only checks that they exist).
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_installed(timeout: float = 300) -> dict[str, str]:
    """Paths of the SLURM programs, installing the Debian packages first when they are missing.

    Set PORTRAITGEN_SLURM_INSTALL=0 to never install (then a missing SLURM is a skip)."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        if os.environ.get("PORTRAITGEN_SLURM_INSTALL", "1") == "0":
            raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and "
                                   f"PORTRAITGEN_SLURM_INSTALL=0")
        if os.geteuid() != 0:
            raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and installing "
                                   f"it needs root")
        if shutil.which("apt-get") is None:
            raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is no "
                                   f"apt-get to install it")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                     "-o", "DPkg::Lock::Timeout=120", *PACKAGES]):
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
            if proc.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): "
                                       f"{(proc.stderr or proc.stdout)[-500:]}")
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} are still missing")
    return {n: _which(n) for n in DAEMONS + CLIENTS}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SlurmCluster:
    """One controller and one node on this host, configured in a temporary folder."""

    def __init__(self, root: Path, partitions: list[str], cpus: int, memory_mb: int, gpus: int,
                 programs: dict[str, str]):
        self.root = root
        self.partitions = partitions
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.programs = programs
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.bin = root / "bin"
        self.pids: dict[str, int] = {}
        self.owns_root = False  # set by `start` when it made the folder (removed again by `stop`)

    # --- configuration ------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "ClusterName=portraitgen-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # No munged needed (22.05); nothing leaves this host.
            "AuthType=auth/none",
            "CredType=cred/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",  # a job without --mem must not take the whole node's memory
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # Without slurmdbd only squeue/scontrol know job states, for MinJobAge seconds after a job
            # ends: far above 3x the executor's status-check delay (the plugin checks this), and
            # longer than a test, which reads its jobs back at the end.
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            # The node advertises what this file says, not what the host has: a 2-core machine can
            # schedule the rules' thread and memory requests (nothing is enforced: task/none).
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        if self.gpus:
            lines.append("GresTypes=gpu")
        lines.append(f"NodeName={self.host} CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} "
                     f"ThreadsPerCore=1 RealMemory={self.memory_mb}{gres} State=UNKNOWN")
        for i, name in enumerate(self.partitions):
            lines.append(f"PartitionName={name} Nodes={self.host} Default={'YES' if i == 0 else 'NO'} "
                         f"MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "plugstack.conf").write_text("")
        if self.gpus:
            # Every fake GPU is a harmless character device: schedulable, sets CUDA_VISIBLE_DEVICES,
            # never opened.
            (r / "gres.conf").write_text("".join(f"NodeName={self.host} Name=gpu File={dev}\n"
                                                 for dev in FAKE_GPU_FILES[:self.gpus]))
        # See the module docstring: the jobstep plugin's inner srun has lost SLURM_CONF.
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "srun"
        wrapper.write_text(f'#!/bin/sh\nexport SLURM_CONF="{self.conf}"\nexec {self.programs["srun"]} "$@"\n')
        wrapper.chmod(0o755)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose SLURM commands talk to this cluster (and whose srun is the wrapper)."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", "")])
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def logs(self, tail: int = 20) -> str:
        out = []
        for name in DAEMONS:
            path = self.root / "log" / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}.log\n" + "\n".join(path.read_text(errors="replace").splitlines()[-tail:]))
        return "\n".join(out)

    # --- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def start(cls, partitions: list[str] = ("debug",), cpus: int = 4, memory_mb: int = 32000, gpus: int = 1,
              root: Path | None = None, timeout: float = 30) -> "SlurmCluster":
        """Install if needed, configure and start a cluster; `SlurmUnavailable` says why it could not."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("running slurmd needs root (SlurmdUser=root)")
        programs = ensure_installed()
        # A short path: slurmd puts unix sockets (<=108 bytes) into its spool folder.
        owns_root = root is None
        root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="pgslurm-", dir="/tmp"))
        cluster = cls(root, list(partitions), cpus, memory_mb, gpus, programs)
        cluster.owns_root = owns_root
        cluster._write_config()
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self, timeout: float) -> None:
        for daemon, args in (("slurmctld", ["-c"]), ("slurmd", [])):
            proc = subprocess.run([self.programs[daemon], *args, "-f", str(self.conf)], env=self.env(),
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"{daemon} did not start ({proc.returncode}): "
                                       f"{(proc.stderr or proc.stdout).strip()[-500:]}\n{self.logs()}")
            pid_file = self.root / "run" / f"{daemon}.pid"
            deadline = time.monotonic() + timeout
            while not (pid_file.exists() and pid_file.read_text().strip()):
                if time.monotonic() > deadline:
                    raise SlurmUnavailable(f"{daemon} wrote no pid file within {timeout:.0f} s\n{self.logs()}")
                time.sleep(0.1)
            self.pids[daemon] = int(pid_file.read_text().split()[0])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state and set(state.split()) == {"idle"}:
                return
            dead = [d for d, pid in self.pids.items() if not _pid_alive(pid)]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited while starting\n{self.logs()}")
            time.sleep(0.3)
        raise SlurmUnavailable(f"the node did not become idle within {timeout:.0f} s (sinfo: {state!r})\n"
                               f"{self.logs()}")

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, shut both daemons down, wait until their processes are gone, and remove
        the cluster's folder when `start` made it."""
        if self.pids:
            try:
                self.run("scancel", "--full", "--user=root", check=False, timeout=10)
                # scancel only asks: a daemon shut down before the job steps end leaves their
                # slurmstepd behind, retrying to report to it.
                deadline = time.monotonic() + 15
                while self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.strip() \
                        and time.monotonic() < deadline:
                    time.sleep(0.3)
                self.run("scontrol", "shutdown", check=False, timeout=10)
            except subprocess.TimeoutExpired:
                pass  # an unresponsive controller: its pid is killed below
        deadline = time.monotonic() + timeout
        while any(_pid_alive(pid) for pid in self.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids.values():
            if _pid_alive(pid):  # only the daemons this cluster started, by pid
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for pid in self._leftover_processes():
            os.kill(pid, signal.SIGKILL)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _leftover_processes(self) -> list[int]:
        """Processes this cluster started that outlived its daemons (job steps, their commands): those
        whose environment names this cluster's slurm.conf, other than this process and its parents."""
        ours = f"SLURM_CONF={self.conf}".encode()
        keep, pid = set(), os.getpid()
        while pid > 1:  # this process and its ancestors
            keep.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in keep:
                continue
            try:
                if ours in (entry / "environ").read_bytes().split(b"\0") and _pid_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
        return found

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
