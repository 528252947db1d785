"""A real one-node SLURM cluster on this machine for the tests: ``munged``, ``slurmctld`` and
``slurmd`` from Debian's packages (``slurm-wlm``, ``munge``), with their own key, ports,
``slurm.conf`` and state in a temporary directory; :func:`start` returns it or raises
:class:`Unavailable` saying why it cannot start."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
INSTALL_TIMEOUT_S = 300
START_TIMEOUT_S = 60


class Unavailable(RuntimeError):
    """SLURM cannot run here (the message says why)."""


@dataclass
class Cluster:
    """A running cluster: ``env`` is this process's environment with ``SLURM_CONF`` set
    (what a SLURM client needs to reach it), ``root`` its temporary directory."""

    root: Path
    env: dict[str, str]
    partition: str = "debug"

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=60, check=check)

    def active_jobs(self) -> list[str]:
        """The ids of the array tasks and jobs pending or running (``squeue -r``)."""
        return self.run("squeue", "-h", "-r", "-o", "%i").stdout.split()

    def running_jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-r", "-t", "running", "-o", "%i").stdout.split()

    def stop(self) -> None:
        """Cancel the jobs left (a failed test's), stop the daemons (SIGTERM, then SIGKILL)
        and delete the directory."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.run("scancel", "--user", str(os.geteuid()), check=False)
            deadline = time.monotonic() + 30
            while self.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            pid_file = self.root / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError):
                _stop(int(pid_file.read_text().split()[0]))
        shutil.rmtree(self.root, ignore_errors=True)


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _binary(name: str) -> str | None:
    """Where program ``name`` is: on PATH, or in /usr/sbin (the daemons, off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def _missing() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _binary(name) is None]


def _install() -> None:
    """``apt-get install slurm-wlm munge`` (as root, with a time limit), or :class:`Unavailable`."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"SLURM is not installed ({', '.join(_missing())} missing) and "
                          "cannot be (apt-get as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    try:
        for command in (install, ["apt-get", "update", "-q"], install):
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S)
            if done.returncode == 0 and not _missing():
                return
    except subprocess.TimeoutExpired:
        raise Unavailable(f"apt-get took more than {INSTALL_TIMEOUT_S} s") from None
    why = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {why}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(root: Path, host: str, munge_socket: Path) -> str:
    return f"""ClusterName=metarep-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MessageTimeout=10
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _daemon(command: list[str], env: dict[str, str], root: Path) -> None:
    """Start daemon ``command[0]`` (it forks; its pid file is in ``root``), or
    :class:`Unavailable` with its error and the end of its log."""
    done = subprocess.run([_binary(command[0]) or command[0], *command[1:]], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        name = command[0]
        logs = " ".join(path.read_text()[-300:] for path in sorted(root.glob(f"{name}*.log")))
        raise Unavailable(f"{command[0]} did not start: {done.stderr.strip()} {logs}".strip())


def start() -> Cluster:
    """Start a one-node cluster (installing SLURM first where it is missing and can be);
    :class:`Unavailable` when it cannot run here."""
    if _missing():
        _install()
    if os.geteuid() != 0:
        raise Unavailable("slurmd needs root")
    root = Path(tempfile.mkdtemp(prefix="metarep-slurm-", dir="/tmp"))
    cluster = Cluster(root, dict(os.environ, SLURM_CONF=str(root / "slurm.conf")))
    try:
        for folder in ("state", "spool"):
            (root / folder).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = root / "munge.socket"
        _daemon(["munged", f"--key-file={key}", f"--socket={munge_socket}",
                 f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                 f"--seed-file={root}/munged.seed", "--force"], cluster.env, root)
        host = socket.gethostname()
        (root / "slurm.conf").write_text(_config(root, host, munge_socket))
        _daemon(["slurmctld"], cluster.env, root)
        _daemon(["slurmd"], cluster.env, root)
        _wait_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_idle(cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise Unavailable(f"the node did not become idle in {START_TIMEOUT_S} s (sinfo: {state!r})")
