"The Slurm executor on a real single-node Slurm cluster (Debian's slurm-wlm, brought up by the `slurm` fixture)."
import contextlib, io, json, os, re, subprocess, sys, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.timeout(600)


def main(*argv):
    "Run `dmstudy.cli.main` in this process; returns (exit code, stdout, stderr)."
    from dmstudy.cli import main as cli_main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli_main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _steps(run_dir) -> list:
    from dmstudy.rundir import RunDir
    return [r['step'] for r in RunDir(run_dir).read_metrics()]


def _rows(run_dir) -> list:
    "A run's metrics rows without their wall-clock fields."
    from dmstudy.rundir import RunDir
    return [{k: v for k, v in r.items() if k not in ('wall_time', 'eval_time')} for r in RunDir(run_dir).read_metrics()]


def _tail(p, n=3000) -> str:
    p = Path(p)
    return p.read_text()[-n:] if p.exists() else f'({p} does not exist)'


def test_smoke_sweep_on_slurm_with_requeues(slurm, tmp_path, monkeypatch):
    """`dmstudy sweep smoke --executor slurm` runs the cells as one job array, through papermill, and waits for them
    while one cell's job is requeued twice — first by Slurm's preemption warning (SIGUSR2, which submitit asks for
    before the time limit: its `Checkpointable` requeues the job with `scontrol requeue`, and the kernel ignores the
    signal), then by `scontrol requeue` from outside, as a preempting scheduler does. Each time Slurm stops the old run
    with SIGTERM, training writes its checkpoint, and the requeued job resumes from it. Every cell ends done with each
    evaluation once and metrics identical to a run that was never interrupted, the results are collected, and a launch
    while the jobs are queued or after they are done submits nothing. (How often Slurm requeues depends on timing and
    is not asserted; that the victim resumed from its checkpoint is.)"""
    for k, v in slurm.env.items(): monkeypatch.setenv(k, v)
    from dmstudy.sweep import sweep_cells, plan_sweep, cell_job
    from dmstudy.rundir import RunDir
    root = tmp_path/'runs'
    sets = {'steps': 300, 'eval_steps': [20, 150, 300]}  # long enough to be requeued mid-training, twice
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', 'sweep', 'smoke', '--executor', 'slurm',
           '--root', str(root), '--time-min', '3', '--poll', '1', '--set', 'steps=300', 'eval_steps=[20, 150, 300]']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cells = sweep_cells('smoke', root, sets)
    victim = cells[0]
    # a run of the victim's config that is never interrupted, trained meanwhile (same thread count as the job: one CPU)
    ref = tmp_path/'ref'; (tmp_path/'ref.yaml').write_text(victim.cfg.to_yaml())
    ref_proc = subprocess.Popen([sys.executable, '-m', 'dmstudy.cli', 'run', str(tmp_path/'ref.yaml'), '--run-dir', str(ref), '--quiet'],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'})

    def diagnose() -> str:
        jid = cell_job(victim.run_dir)
        errs = sorted(root.glob(f'smoke/.submitit/**/{jid}_*log.err')) if jid else []
        return '\n'.join([slurm.run('squeue', '-t', 'all', check=False).stdout, slurm.run('scontrol', 'show', 'job', jid or '0', check=False).stdout,
                          '--- job stderr', _tail(errs[0]) if errs else '(none)', '--- cell log', _tail(RunDir(victim.run_dir).log_path),
                          '--- slurmctld', _tail(slurm.root/'log'/'slurmctld.log', 1500), '--- slurmd', _tail(slurm.root/'log'/'slurmd.log', 1500)])

    def wait_for_step(n):
        t0 = time.time()
        while not n in _steps(victim.run_dir):
            assert proc.poll() is None and time.time() - t0 < 300, f"no evaluation at step {n}:\n{diagnose()}"
            time.sleep(0.1)

    try:
        wait_for_step(20)
        jid = cell_job(victim.run_dir)
        assert re.fullmatch(r'\d+_0', jid), jid
        # a launch while the array is queued or running submits nothing
        again = plan_sweep('smoke', root=root, sets=sets)
        assert not again.todo and [r['outcome'] for r in again.skipped.values()] == ['busy', 'busy'], again.skipped
        slurm.run('scancel', '--signal=USR2', jid)
        wait_for_step(150)
        slurm.run('scontrol', 'requeue', jid)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None: proc.kill()
        ref_out, _ = ref_proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out}\n{diagnose()}"
    assert re.search(r'submitted job array \d+ \(2 cells\)', out) and 'smoke: 2 done, 0 failed' in out, out
    for c in cells:
        assert RunDir(c.run_dir).status == 'done' and _steps(c.run_dir) == [20, 150, 300], _tail(RunDir(c.run_dir).log_path)
        nb = json.loads(RunDir(c.run_dir).notebook_path.read_text())
        src = ''.join(next(x['source'] for x in nb['cells'] if 'injected-parameters' in x['metadata'].get('tags', [])))
        assert f'n_train = {c.cfg.n_train}' in src and 'steps = 300' in src, src
        assert 'Executing notebook with kernel: python3' in RunDir(c.run_dir).log_path.read_text()
    q = slurm.run('squeue', '-h', '-t', 'all', '-o', '%i %T')
    assert len(re.findall(r'^\d+_[01] COMPLETED$', q.stdout, re.M)) == 2, q.stdout
    errs = sorted(root.glob(f"smoke/.submitit/**/{cell_job(victim.run_dir)}_*log.err"))
    assert errs and any('Caught signal SIGUSR2' in e.read_text() for e in errs)
    # the victim was stopped and resumed from its checkpoint: at least once after its first evaluation, and it never
    # started over from step 0 once a checkpoint existed
    log = RunDir(victim.run_dir).log_path.read_text()
    resumed = [int(m) for m in re.findall(r'resuming .* at step (\d+)', log)]
    assert resumed and all(20 <= k < 300 for k in resumed) and resumed == sorted(resumed), log[-3000:]
    # and it ends as a run that was never interrupted
    assert ref_proc.returncode == 0, ref_out
    assert _rows(victim.run_dir) == _rows(ref)
    # the results, and a launch that finds everything done
    rc, out, err = main('collect', 'smoke', '--root', root, '--out', tmp_path/'results')
    assert rc == 0, err
    from dmstudy.analysis import read_results
    df = read_results(tmp_path/'results'/'smoke.parquet')
    assert sorted(df.N.unique()) == [16, 32] and set(df.sweep) == {'smoke'} and df.step.max() == 300
    rc, out, err = main('sweep', 'smoke', '--executor', 'slurm', '--root', root, '--set', 'steps=300', 'eval_steps=[20, 150, 300]')
    assert rc == 0 and '0 to run' in out and 'submitted' not in out, out + err
