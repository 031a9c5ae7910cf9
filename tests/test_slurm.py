"The Slurm executor on a real single-node Slurm cluster (Debian's slurm-wlm, brought up by the `slurm` fixture)."
import contextlib, io, json, re, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.timeout(600)


def main(*argv):
    from dmstudy.cli import main as cli_main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli_main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _steps(run_dir) -> list:
    return [json.loads(l)['step'] for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines() if l.strip()]


def _tail(p, n=3000) -> str:
    p = Path(p)
    return p.read_text()[-n:] if p.exists() else f'({p} does not exist)'


def _diagnose(slurm, job, cell) -> str:
    "What the cluster and the job say, for a failing assertion."
    return '\n'.join([slurm.run('squeue', '-t', 'all', check=False).stdout, slurm.run('scontrol', 'show', 'job', job.job_id, check=False).stdout,
                      '--- job stderr', _tail(job.paths.stderr), '--- job stdout', _tail(job.paths.stdout), '--- cell log', _tail(cell.run_dir/'log.txt'),
                      '--- slurmctld', _tail(slurm.root/'log'/'slurmctld.log', 1500), '--- slurmd', _tail(slurm.root/'log'/'slurmd.log', 1500)])


def test_smoke_sweep_on_slurm(slurm, dmstudy, tmp_path, monkeypatch):
    "`dmstudy sweep smoke --executor slurm`: one job array, every cell done through papermill, results collected."
    root = tmp_path/'runs'
    r = dmstudy('sweep', 'smoke', '--executor', 'slurm', '--root', root, '--time-min', 3, '--poll', 1, env=slurm.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r'submitted job array \d+ \(2 cells\)', r.stdout), r.stdout
    from dmstudy.sweep import sweep_cells
    from dmstudy.train import read_status
    from dmstudy.config import RunConfig
    cells = sweep_cells('smoke', root=root)
    for c in cells:
        assert read_status(c.run_dir) == 'done', (c.run_dir/'log.txt').read_text()[-3000:]
        assert _steps(c.run_dir) == [20, 43, 60]
        assert RunConfig.from_json(c.run_dir/'config.json') == c.cfg
        assert 'Executing notebook with kernel: python3' in (c.run_dir/'log.txt').read_text()
        nb = json.loads((c.run_dir/'run.ipynb').read_text())
        assert any('injected-parameters' in x['metadata'].get('tags', []) for x in nb['cells'])
    # the jobs were a Slurm array and ran to completion there
    q = slurm.run('squeue', '-h', '-t', 'all', '-o', '%i %T')
    assert len(re.findall(r'^\d+_[01] COMPLETED$', q.stdout, re.M)) == 2, q.stdout
    for k, v in slurm.env.items(): monkeypatch.setenv(k, v)
    rc, out, err = main('collect', 'smoke', '--root', root, '--out', tmp_path/'results')
    assert rc == 0, err
    from dmstudy.analysis import read_results
    df = read_results(tmp_path/'results'/'smoke.parquet')
    assert sorted(df.N.unique()) == [16, 32] and set(df.sweep) == {'smoke'}
    # launching again submits nothing
    rc, out, err = main('sweep', 'smoke', '--executor', 'slurm', '--root', root)
    assert rc == 0 and '0 to run' in out and 'submitted' not in out, out + err


def test_preempted_job_is_requeued_and_resumes(slurm, tmp_path, monkeypatch):
    """Slurm's preemption warning (SIGUSR2, what submitit asks for before the time limit) reaches the job: submitit's
    `Checkpointable` requeues it (`scontrol requeue`), Slurm stops the old run with SIGTERM — training writes its
    checkpoint, the kernel ignores the USR2 itself — and the requeued job resumes the cell from there to the end."""
    for k, v in slurm.env.items(): monkeypatch.setenv(k, v)
    from dmstudy.sweep import launch, wait_slurm, sweep_cells
    from dmstudy.train import read_status
    import torch
    root, sw = tmp_path/'runs', tmp_path/'requeue.yaml'
    sw.write_text('base: {dataset: digits, image_size: 16, unet: micro, batch_size: 8, lr: 1.0e-3, metrics: [loss], n_eval: 64, '
                  'n_samples: 16, sample_steps: 4, sample_grid: 16, loss_eval_n: 32, device: cpu}\n'
                  'grid: {n_train: [16]}\nresources: {cpus: 1, time_min: 3}\n')
    sets = {'steps': 300, 'eval_steps': [20, 300]}
    jobs = launch(sw, executor='slurm', root=root, sets=sets, params={'show': False}, wait=False, log=lambda s: None)
    assert len(jobs) == 1
    cell = sweep_cells(sw, root, sets)[0]
    # a second launch while the job is queued or running does not submit the cell again
    again = launch(sw, executor='slurm', root=root, sets=sets, params={'show': False}, log=lambda s: None)
    assert [r['outcome'] for r in again] == ['busy'], again
    ckpt = cell.run_dir/'ckpt'/'latest.pt'
    t0 = time.time()
    while not ckpt.exists():
        assert time.time() - t0 < 300, f"no checkpoint after 300 s:\n{_diagnose(slurm, jobs[0], cell)}"
        time.sleep(0.1)
    jid = jobs[0].job_id
    slurm.run('scancel', '--signal=USR2', jid)
    out = wait_slurm(jobs, [cell], poll=1, log=lambda s: None)
    assert out[0]['outcome'] == 'done', f"{out}\n{_diagnose(slurm, jobs[0], cell)}"
    assert read_status(cell.run_dir) == 'done' and torch.load(ckpt, weights_only=True)['step'] == 300
    assert re.search(r'Restarts=1\b', slurm.run('scontrol', 'show', 'job', jid).stdout)
    assert 'Caught signal SIGUSR2' in Path(jobs[0].paths.stderr).read_text()
    log = (cell.run_dir/'log.txt').read_text()
    m = re.search(r'resuming .* at step (\d+)', log)
    assert log.count('=== ') == 2 and m and 20 <= int(m.group(1)) < 300, log[-3000:]
    assert _steps(cell.run_dir) == [20, 300]
