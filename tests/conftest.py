"Shared fixtures: a real single-node Slurm cluster on this machine; tests that share a fixture stay in one pytest-xdist worker."
import os, re, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest


# ---------------------------------------------------------------------------------------------------------------
# A single-node Slurm cluster from Debian's slurm-wlm and munge packages: loopback only, configuration, state and logs
# in a temporary directory, daemons started in the foreground and stopped by PID.

SLURM_PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
SLURM_BINARIES = ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'scontrol', 'munged')

# Without slurmdbd there is no accounting, and submitit asks `sacct` for job states: this stand-in answers its
# `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from `squeue -t all` (which keeps finished jobs for MinJobAge).
SACCT = r'''#!/bin/sh
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$ids${ids:+,}$2"; shift 2;; *) shift;; esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] || exit 0
squeue -h -t all -j "$ids" -o "%i|%T|%N" 2>/dev/null
exit 0
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _ensure_slurm_installed() -> str:
    "'' when the Slurm binaries are present (installing Debian's packages if needed and possible), else why not."
    if all(shutil.which(b) for b in SLURM_BINARIES): return ''
    if not sys.platform.startswith('linux'): return 'Slurm needs Linux'
    if os.geteuid() != 0 or not shutil.which('apt-get'): return f"Slurm is not installed and cannot be (needs root and apt-get): apt-get install {' '.join(SLURM_PACKAGES)}"
    try:
        r = subprocess.run(['apt-get', 'install', '-y', '-q', '--no-install-recommends', *SLURM_PACKAGES], capture_output=True, text=True,
                           timeout=600, env={**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'})
    except (OSError, subprocess.TimeoutExpired) as e: return f'apt-get install {" ".join(SLURM_PACKAGES)} failed: {e}'
    if r.returncode != 0 or not all(shutil.which(b) for b in SLURM_BINARIES):
        return f"apt-get install {' '.join(SLURM_PACKAGES)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return ''


class SlurmCluster:
    "munged, slurmctld and slurmd for one node, all in `root`; `env` is what a client needs (SLURM_CONF, PATH)."

    def __init__(self, root):
        self.root, self.procs, self.munged_pid = Path(root), {}, None

    def start(self, timeout=60):
        r = self.root
        for d in ('munge', 'state', 'spool', 'log', 'bin'): (r/d).mkdir(parents=True, exist_ok=True)
        os.chmod(r/'munge', 0o700)
        key = r/'munge'/'munge.key'
        key.write_bytes(os.urandom(1024)); os.chmod(key, 0o600)
        self.socket = r/'munge'/'munge.socket'
        subprocess.run(['munged', '--force', f'--socket={self.socket}', f'--key-file={key}', f'--pid-file={r}/munge/munged.pid',
                        f'--log-file={r}/log/munged.log', f'--seed-file={r}/munge/munged.seed'], check=True, capture_output=True, timeout=30)
        self.munged_pid = int((r/'munge'/'munged.pid').read_text())
        node = subprocess.run(['slurmd', '-C'], capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()[0]
        node = re.sub(r'^NodeName=(\S+)', r'NodeName=\1 NodeAddr=127.0.0.1', node)
        self.conf = r/'slurm.conf'
        self.conf.write_text(f"""ClusterName=dmstudy-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
{node}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        sacct = r/'bin'/'sacct'; sacct.write_text(SACCT); os.chmod(sacct, 0o755)
        self.env = {'SLURM_CONF': str(self.conf), 'PATH': f"{r/'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        env = {**os.environ, **self.env}
        for name, cmd in (('slurmctld', ['slurmctld', '-D', '-i', '-f', str(self.conf)]), ('slurmd', ['slurmd', '-D', '-f', str(self.conf)])):
            self.procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=open(r/'log'/f'{name}.out', 'w'), stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            s = self.run('sinfo', '-h', '-o', '%t', check=False)
            if s.stdout.strip() in ('idle', 'mix', 'alloc'): return self
            for n, p in self.procs.items():
                if p.poll() is not None: raise RuntimeError(f"{n} exited ({p.returncode}): {(r/'log'/f'{n}.out').read_text()[-2000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm node did not become idle in {timeout} s: {s.stdout} {s.stderr}")

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        "Run a Slurm client command against this cluster."
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, check=check, timeout=60)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None: p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try: p.wait(15)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
        if self.munged_pid:
            try: os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError: pass


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    "A running single-node Slurm cluster (skips, saying why, where Slurm cannot be installed; fails instead in CI)."
    why = _ensure_slurm_installed()
    if why and os.environ.get('DMSTUDY_CI') == '1': pytest.fail(why)  # .ci/run installs Slurm: there its absence is a failure
    if why: pytest.skip(why)
    c = SlurmCluster(tmp_path_factory.mktemp('slurm'))
    try: yield c.start()
    finally: c.stop()


# ---------------------------------------------------------------------------------------------------------------
# `make pytest` runs the tests in two pytest-xdist workers with `--dist loadgroup`. Tests of a module that share one of
# its module- or session-scoped fixtures (directly or through another fixture) form one group, which runs in one
# worker, so the fixture is built once; every other test goes to whichever worker is free.

@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    if not (getattr(config.option, 'loadgroup', False) or getattr(config.option, 'dist', 'no') == 'loadgroup'): return  # a worker sees dist 'no' and loadgroup True
    parent = {}
    def find(k):
        while parent.setdefault(k, k) != k: k = parent[k]
        return k
    shared = {}
    for item in items:
        info = getattr(item, '_fixtureinfo', None)
        if info is None: continue
        names = [(item.module.__name__, n) for n, defs in info.name2fixturedefs.items()
                 if defs and defs[-1].scope != 'function' and defs[-1].baseid]  # the project's own, not pytest's
        if not names: continue
        shared[item] = names[0]
        for n in names[1:]: parent[find(n)] = find(names[0])
    for item, n in shared.items():
        module, fixture = find(n)
        item.add_marker(pytest.mark.xdist_group(f'{module}:{fixture}'))
