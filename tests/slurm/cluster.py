"""A real Slurm cluster on one machine, for CI: munged + slurmctld + N slurmd "nodes" on 127.0.0.1.

    python -m tests.slurm.cluster up [--state-dir D] [--nodes 2]   # prints `export SLURM_CONF=...`
    python -m tests.slurm.cluster status | down

What it does (Debian slurm-wlm 22.05 + munge; installs them with apt-get when missing):

* a private munged (own key, socket, pid and log files) started as the munge user;
* ``slurm.conf``/``gres.conf`` in the state dir; every node has ``NodeAddr=127.0.0.1``, its own slurmd
  ``Port`` and ``SlurmdSpoolDir``; fake GPUs are char devices (``mknod c 1 3``) so ``--gpus-per-node``
  is scheduled and ``CUDA_VISIBLE_DEVICES`` set exactly as on a GPU cluster;
* the daemons run inside a private mount namespace (``unshare --mount``) where a hosts file that maps
  the node names to 127.0.0.1 is bind-mounted over /etc/hosts: jobs see resolvable node names (the
  batch script's ``MASTER_ADDR`` is the first node's name), the rest of the machine is untouched;
* ``AuthInfo=...,cred_expire=5`` and ``bf_interval=1``: a requeued job waits cred_expire seconds
  (and a scheduler pass) before it may start again (120 s by default: too long for CI);
  ``MinJobAge=16``: shorter lets ``sbatch --wait`` report a failed job as exit 0.

``up`` is idempotent (a live cluster with the same layout is reused, in well under a second);
with ``owner_pid`` (the test process) the supervisor shuts the cluster down by itself once that
process is gone, even if it was SIGKILLed before its teardown ran. ``down`` stops everything this
module started: queued jobs are cancelled, the daemons are stopped
by their pid files, and any process left in the cluster's private mount namespace (slurmstepd, job
tasks) is killed by pid. Nothing else on the machine is signalled.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("MGRPO_SLURM_STATE", "/tmp/mgrpo-slurm"))
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
APT_PACKAGES = ("slurm-wlm", "munge")


class ClusterError(RuntimeError):
    pass


# ---- packages -----------------------------------------------------------------------------------

def ensure_packages(binaries=REQUIRED_BINARIES, packages=APT_PACKAGES) -> list[str]:
    """Install `packages` with apt-get when any of `binaries` is missing; returns what was installed.

    Raises ClusterError (with the reason) when they cannot be installed: CI must fail loudly, not skip.
    """
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise ClusterError(f"{', '.join(missing)} not found and apt-get is not available: install "
                           f"{' '.join(packages)} (Debian/Ubuntu package names) on this machine")
    if os.geteuid() != 0:
        raise ClusterError(f"{', '.join(missing)} not found; installing {' '.join(packages)} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=180"]  # another apt/dpkg run on the machine: wait, do not fail
    install = ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages]
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # stale or empty package lists on a fresh machine: update once, retry
        u = subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, capture_output=True, text=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(f"apt-get install {' '.join(packages)} failed (rc {r.returncode}):\n"
                               f"{u.stderr[-2000:]}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    still = [b for b in binaries if shutil.which(b) is None]
    if still:
        raise ClusterError(f"installed {' '.join(packages)} but {', '.join(still)} still not on PATH")
    return list(packages)


# ---- layout -------------------------------------------------------------------------------------

@dataclass
class Cluster:
    state_dir: str
    nodes: list[str]
    gpus_per_node: int
    cpus_per_node: int
    ctld_port: int = 0
    node_ports: dict[str, int] = field(default_factory=dict)
    mnt_ns: str = ""  # /proc/<pid>/ns/mnt link target of the daemons' private mount namespace
    owner_pid: int = 0  # when set, the cluster stops itself once this process is gone

    @property
    def root(self) -> Path:
        return Path(self.state_dir)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, base: dict | None = None) -> dict:
        """Environment for client commands (sbatch, squeue, ...) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[k]  # a CI runner inside a Slurm job must not leak its own job into ours
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env(kw.pop("env", None)), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed (rc {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if not p.is_file():
                continue
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(out)

    # pid files
    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def daemon_pids(self) -> dict[str, int | None]:
        pids = {"munged": self._pid("munged.pid"), "slurmctld": self._pid("slurmctld.pid")}
        for n in self.nodes:
            pids[f"slurmd-{n}"] = self._pid(f"slurmd-{n}.pid")
        return pids


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _slurm_conf(c: Cluster) -> str:
    r = c.root
    lines = [
        "# written by tests/slurm/cluster.py: a CI cluster on 127.0.0.1 (not a production config)",
        "ClusterName=mgrpo-ci",
        # slurmctld only starts on the host named here: the machine's own (short) host name
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={c.ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also bounds how long a requeued job waits before it may run again (default 120 s)
        f"AuthInfo=socket={c.munge_socket},cred_expire=5",
        f"StateSaveLocation={r}/ctld",
        f"SlurmdSpoolDir={r}/spool/%n",
        f"SlurmctldPidFile={r}/run/slurmctld.pid",
        f"SlurmdPidFile={r}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={r}/log/slurmctld.log",
        f"SlurmdLogFile={r}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"PlugStackConfig={r}/etc/plugstack.conf",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "GresTypes=gpu",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={r}/log/jobcomp.txt",
        "JobRequeue=1",
        "MinJobAge=16",
        "KillWait=5",
        "InactiveLimit=0",
        "Waittime=0",
        "ReturnToService=2",
        "SlurmdTimeout=60",
        "SchedulerParameters=sched_interval=1,sched_min_interval=0,bf_interval=1",  # requeue restart: ~cred_expire s
    ]
    for n in c.nodes:
        lines.append(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={c.node_ports[n]} "
                     f"CPUs={c.cpus_per_node} RealMemory=8000 Gres=gpu:{c.gpus_per_node} State=UNKNOWN")
    lines.append(f"PartitionName=ci Nodes={','.join(c.nodes)} Default=YES MaxTime=60 State=UP")
    return "\n".join(lines) + "\n"


def _gres_conf(c: Cluster) -> str:
    out = []
    for n in c.nodes:
        for i in range(c.gpus_per_node):
            out.append(f"NodeName={n} Name=gpu File={c.root}/dev/{n}-gpu{i}")
    return "\n".join(out) + "\n"


# ---- up / down ----------------------------------------------------------------------------------

def _load(state_dir: Path) -> Cluster | None:
    try:
        return Cluster(**json.loads((state_dir / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _healthy(c: Cluster) -> bool:
    pids = c.daemon_pids()
    if not all(_alive(p) for p in pids.values()):
        return False
    try:
        r = c.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    return r.returncode == 0 and all(states.get(n, "").rstrip("*") in ("idle", "allocated", "mixed") for n in c.nodes)


def up(state_dir: Path | str = DEFAULT_STATE_DIR, nodes: int = 2, gpus_per_node: int = 2,
       cpus_per_node: int = 4, timeout: float = 60, owner_pid: int = 0) -> Cluster:
    """Start (or reuse) the cluster; returns it with every node idle. With `owner_pid`, the cluster
    stops itself when that process exits."""
    state_dir = Path(state_dir)
    names = [f"node{i + 1}" for i in range(nodes)]
    old = _load(state_dir)
    if old and old.nodes == names and old.gpus_per_node == gpus_per_node and old.cpus_per_node == cpus_per_node \
            and old.owner_pid == owner_pid and _healthy(old):
        return old
    if old:
        down(state_dir)
    ensure_packages()
    if os.geteuid() != 0:
        raise ClusterError("the CI Slurm cluster needs root (mount namespace, munge user, slurmd)")

    # munged runs as the munge user and must reach its files: every parent must be searchable by others
    for parent in state_dir.resolve().parents:  # (the state dir itself is recreated 0755)
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise ClusterError(f"{parent} is not searchable by other users, so munged (user munge) cannot reach "
                               f"{state_dir}; use a state dir under /tmp (e.g. tempfile.mkdtemp(dir='/tmp'))")
    if state_dir.exists():
        shutil.rmtree(state_dir)
    for sub in ("etc", "ctld", "run", "log", "dev", "munge", *(f"spool/{n}" for n in names)):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    ports = _free_ports(1 + nodes)
    c = Cluster(str(state_dir), names, gpus_per_node, cpus_per_node, ports[0], dict(zip(names, ports[1:])),
                owner_pid=owner_pid)
    r = c.root
    os.chmod(r, 0o755)

    for n in names:  # fake GPUs: char devices (same major/minor as /dev/null)
        for i in range(gpus_per_node):
            try:
                os.mknod(r / "dev" / f"{n}-gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
            except OSError as e:
                raise ClusterError(f"cannot create the fake GPU device files (mknod: {e}); "
                                   "gres.conf needs character devices") from None
    c.conf.write_text(_slurm_conf(c))
    (r / "etc" / "gres.conf").write_text(_gres_conf(c))
    (r / "etc" / "plugstack.conf").write_text("")  # never load the machine's SPANK plugins (pyxis)
    hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").is_file() else ""
    (r / "etc" / "hosts").write_text(hosts.rstrip("\n") + "\n127.0.0.1 " + " ".join(names) + "\n")

    # munge: own key/socket/logs, owned by the munge user (munged refuses a key others can read)
    munge = pwd.getpwnam("munge")
    mdir = r / "munge"
    (mdir / "munge.key").write_bytes(os.urandom(1024))
    for p in (mdir, mdir / "munge.key"):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    os.chmod(mdir, 0o755)  # clients (any user) must reach the socket
    os.chmod(mdir / "munge.key", 0o400)
    (r / "run").chmod(0o755)

    (r / "cluster.json").write_text(json.dumps(asdict(c), indent=1))
    log = open(r / "log" / "supervisor.log", "ab")
    # `unshare` execs the supervisor (same pid) inside a private mount namespace
    sup = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable,
                            str(Path(__file__).resolve()), "_supervise", "--state-dir", str(r)],
                           env=c.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    (r / "run" / "supervisor.pid").write_text(f"{sup.pid}\n")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sup.poll() is not None:
                raise ClusterError(f"the supervisor exited (rc {sup.returncode})")
            if not c.mnt_ns:
                try:
                    ns = os.readlink(f"/proc/{sup.pid}/ns/mnt")
                except OSError:
                    ns = ""
                if ns and ns != os.readlink("/proc/self/ns/mnt"):
                    c.mnt_ns = ns
                    (r / "cluster.json").write_text(json.dumps(asdict(c), indent=1))
            if c.mnt_ns and (r / "run" / "ready").exists() and _healthy(c):
                return c
            time.sleep(0.1)
        raise ClusterError(f"not ready in {timeout:.0f} s; daemons {c.daemon_pids()}")
    except BaseException as e:
        tail = c.log_tail()
        ok = c.conf.is_file()
        sinfo = c.run("sinfo", "-N", check=False).stdout if ok else ""
        down(r)
        if isinstance(e, ClusterError):
            raise ClusterError(f"{e}\n{sinfo}\n{tail}") from None
        raise


def _supervise(state_dir: Path) -> int:
    """Runs inside the private mount namespace: owns (and reaps) every daemon and orphaned slurmstepd.

    SIGTERM: stop slurmd/slurmctld, then whatever else is left in the namespace, munged last.
    """
    import ctypes

    c = _load(state_dir)
    r = c.root
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    subprocess.run(["mount", "--bind", str(r / "etc" / "hosts"), "/etc/hosts"], check=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    mdir = r / "munge"
    munge = pwd.getpwnam("munge")
    procs: dict[str, subprocess.Popen] = {}
    out = open(r / "log" / "supervisor.log", "ab")

    def start(name, cmd, **kw):
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kw)
        (r / "run" / f"{name}.pid").write_text(f"{procs[name].pid}\n")

    def log(msg: str) -> None:
        out.write(f"supervisor: {msg}\n".encode())
        out.flush()

    def reap():
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    try:
        # munged refuses dirs others may write to; --force accepts the sticky /tmp above the state dir
        start("munged", ["munged", "-F", "--force", f"--socket={c.munge_socket}", f"--key-file={mdir}/munge.key",
                         f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                         f"--seed-file={mdir}/munged.seed"], user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        deadline = time.monotonic() + 20
        while not c.munge_socket.exists() and time.monotonic() < deadline and procs["munged"].poll() is None:
            time.sleep(0.02)
        if not c.munge_socket.exists():
            log(f"munged did not start (rc {procs['munged'].poll()}); see the munged lines above")
            return 1
        start("slurmctld", ["slurmctld", "-D", "-f", str(c.conf)])
        for n in c.nodes:
            # own UTS namespace: the node's tasks see `hostname` == its node name, as on a real cluster
            start(f"slurmd-{n}", ["unshare", "--uts", "bash", "-c", 'hostname "$1" && exec slurmd -D -f "$2" -N "$1"',
                                  "_", n, str(c.conf)])
        (r / "run" / "ready").write_text("1\n")
        while not stop:
            reap()
            if c.owner_pid and not _alive(c.owner_pid):
                log(f"owner process {c.owner_pid} is gone: shutting down")
                break
            time.sleep(0.2)
        return 0
    finally:  # whatever happened above: nothing this supervisor started outlives it
        slurm = [p.pid for k, p in procs.items() if k != "munged"]
        _stop_reaping(slurm, reap, timeout=10, signals=(signal.SIGTERM,))
        me = os.getpid()
        munged = procs["munged"].pid if "munged" in procs else None
        rest = [p for p in _procs_in_ns(os.readlink("/proc/self/ns/mnt"), allow_own=True) if p not in (me, munged)]
        _stop_reaping(rest + slurm, reap, timeout=5)
        if munged:
            _stop_reaping([munged], reap, timeout=5)
        reap()
        (r / "run" / "ready").unlink(missing_ok=True)
        log("stopped")


def _stop_reaping(pids: list[int], reap, timeout: float, signals=(signal.SIGTERM, signal.SIGKILL)) -> None:
    for sig in signals:
        pids = [p for p in pids if _alive(p)]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            reap()
            time.sleep(0.05)


def _procs_in_ns(ns: str, allow_own: bool = False) -> list[int]:
    """Pids whose mount namespace is `ns` (the cluster's private one); never init's, nor the caller's
    unless `allow_own` (the supervisor, which lives in it)."""
    mine = set() if allow_own else {os.readlink("/proc/self/ns/mnt")}
    try:
        mine.add(os.readlink("/proc/1/ns/mnt"))
    except OSError:
        pass
    if not ns or ns in mine:
        return []
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "ns" / "mnt") == ns:
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _stop(pids: list[int], timeout: float) -> None:
    _stop_reaping(pids, lambda: None, timeout)


def down(state_dir: Path | str = DEFAULT_STATE_DIR) -> None:
    """Cancel jobs, then stop the supervisor, which stops every daemon and job process it owns.
    Falls back to killing, by pid, whatever is left in the cluster's mount namespace. Idempotent."""
    state_dir = Path(state_dir)
    c = _load(state_dir)
    if c is None:
        return
    if _alive(c.daemon_pids().get("slurmctld")):
        try:
            c.run("scancel", "--quiet", "--user=root", check=False, timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                q = c.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass
    sup = c._pid("supervisor.pid")
    _stop([sup] if sup else [], timeout=30)
    _stop([p for p in c.daemon_pids().values() if p], timeout=5)
    _stop(_procs_in_ns(c.mnt_ns), timeout=5)
    (state_dir / "cluster.json").unlink(missing_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down", "status", "_supervise"])
    ap.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=4)
    a = ap.parse_args(argv)
    try:
        if a.action == "_supervise":
            return _supervise(Path(a.state_dir))
        if a.action == "up":
            t0 = time.monotonic()
            c = up(a.state_dir, a.nodes, a.gpus_per_node, a.cpus_per_node)
            print(f"# cluster up in {time.monotonic() - t0:.1f} s: nodes {','.join(c.nodes)}", file=sys.stderr)
            print(f"export SLURM_CONF={c.conf}")
        elif a.action == "down":
            down(a.state_dir)
        else:
            c = _load(Path(a.state_dir))
            if c is None or not _healthy(c):
                print("down")
                return 1
            print(c.run("sinfo", "-N", "-l").stdout)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
