"The Slurm executor on a real single-node Slurm cluster (Debian's slurm-wlm, brought up by the `slurm` fixture)."
import json, re, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.timeout(600)


def _steps(run_dir) -> list:
    return [json.loads(l)['step'] for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines() if l.strip()]


def test_smoke_sweep_on_slurm(slurm, dmstudy, tmp_path):
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
    r = dmstudy('collect', 'smoke', '--root', root, '--out', tmp_path/'results')
    assert r.returncode == 0, r.stderr
    from dmstudy.analysis import read_results
    df = read_results(tmp_path/'results'/'smoke.parquet')
    assert sorted(df.N.unique()) == [16, 32] and set(df.sweep) == {'smoke'}
    # launching again submits nothing
    r = dmstudy('sweep', 'smoke', '--executor', 'slurm', '--root', root, env=slurm.env)
    assert r.returncode == 0 and '0 to run' in r.stdout and 'submitted' not in r.stdout, r.stdout + r.stderr


def test_requeued_job_resumes(slurm, tmp_path, monkeypatch):
    "A job requeued by Slurm (as on preemption) starts again and the cell resumes from its checkpoint to the end."
    for k, v in slurm.env.items(): monkeypatch.setenv(k, v)
    from dmstudy.sweep import launch, wait_slurm, sweep_cells
    from dmstudy.train import read_status
    root = tmp_path/'runs'
    sw = tmp_path/'requeue.yaml'
    sw.write_text('base: {dataset: digits, image_size: 16, unet: micro, batch_size: 8, lr: 1.0e-3, metrics: [loss], n_eval: 64, '
                  'n_samples: 16, sample_steps: 4, sample_grid: 16, loss_eval_n: 32, device: cpu}\n'
                  'grid: {n_train: [16]}\nresources: {cpus: 1, time_min: 3}\n')
    sets = {'steps': 300, 'eval_steps': [20, 300]}
    jobs = launch(sw, executor='slurm', root=root, sets=sets, params={'show': False}, wait=False)
    assert len(jobs) == 1
    cell = sweep_cells(sw, root, sets)[0]
    ckpt = cell.run_dir/'ckpt'/'latest.pt'
    t0 = time.time()
    while not ckpt.exists():
        assert time.time() - t0 < 180, f"no checkpoint after 180 s: {slurm.run('squeue', '-t', 'all').stdout}"
        time.sleep(0.2)
    jid = jobs[0].job_id
    slurm.run('scontrol', 'requeue', jid)
    out = wait_slurm(jobs, [cell], poll=1, log=lambda s: None)
    assert out[0]['outcome'] == 'done', (out, (cell.run_dir/'log.txt').read_text()[-3000:])
    assert read_status(cell.run_dir) == 'done'
    info = slurm.run('scontrol', 'show', 'job', jid).stdout
    assert re.search(r'Restarts=1\b', info), info
    log = (cell.run_dir/'log.txt').read_text()
    assert log.count('=== ') == 2 and 'resuming' in log, log[-3000:]
    assert _steps(cell.run_dir) == [20, 300]
