"Sweeps across processes: the smoke sweep through papermill, collect, idempotence, kill and resume, signals, early errors."
import contextlib, io, json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

SMOKE_BASE = yaml.safe_load((Path(__file__).parents[1]/'dmstudy'/'sweeps'/'smoke.yaml').read_text())['base']


def dmstudy_cmd(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    "Run the `dmstudy` console script (through this interpreter) and capture its output."
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def main(*argv):
    "Run `dmstudy.cli.main` in this process; returns (exit code, stdout, stderr)."
    from dmstudy.cli import main as cli_main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli_main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def write_sweep(path, grid, **base) -> Path:
    "A sweep file: the smoke sweep's base with changes."
    Path(path).write_text(yaml.safe_dump({'base': {**SMOKE_BASE, **base}, 'grid': grid, 'resources': {'cpus': 1}}))
    return Path(path)


def metrics_rows(run_dir) -> list:
    "A run's metrics rows without their wall-clock fields."
    from dmstudy.rundir import RunDir
    return [{k: v for k, v in r.items() if k not in ('wall_time', 'eval_time')} for r in RunDir(run_dir).read_metrics()]


def descendants(pid:int) -> list:
    "(pid, command line) of every live descendant of a process, from /proc."
    kids = {}
    for d in Path('/proc').glob('[0-9]*'):
        try: ppid = int((d/'stat').read_text().rsplit(')', 1)[1].split()[1]); kids.setdefault(ppid, []).append(int(d.name))
        except (OSError, IndexError, ValueError): pass
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            try: out.append((k, (Path('/proc')/str(k)/'cmdline').read_bytes().replace(b'\0', b' ').decode())); todo.append(k)
            except OSError: pass
    return out


def alive(pid:int) -> bool:
    try: stat = (Path('/proc')/str(pid)/'stat').read_text()
    except OSError: return False
    return stat.rsplit(')', 1)[1].split()[0] != 'Z'


def wait_until(cond, what, timeout=300, proc=None):
    t0 = time.time()
    while not cond():
        assert proc is None or proc.poll() is None, f"the launcher ended before {what}: {proc.stdout.read() if proc.stdout else ''}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def injected(nb_path) -> str:
    "The source of the cell papermill injected into an executed notebook."
    nb = json.loads(Path(nb_path).read_text())
    cells = [c for c in nb['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert len(cells) == 1, 'no injected-parameters cell'
    return ''.join(cells[0]['source'])


@pytest.fixture(scope='session')
def smoke(tmp_path_factory):
    "The smoke sweep, run once with `dmstudy sweep smoke --jobs 2`: (root, result, seconds)."
    root = tmp_path_factory.mktemp('smoke')/'runs'
    t0 = time.time()
    r = dmstudy_cmd('sweep', 'smoke', '--jobs', 2, '--root', root)
    return root, r, time.time() - t0


def test_smoke_sweep_runs_two_cells_through_papermill(smoke):
    root, r, secs = smoke
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'smoke: 2 cells, 2 to run (local)' in r.stdout and 'smoke: 2 done, 0 failed' in r.stdout, r.stdout
    from dmstudy.rundir import RunDir
    spans = []
    for n in (16, 32):
        d = root/'smoke'/f'n{n}_micro_b8_lr1e-3_s0'
        # progress: a line as each cell starts, saying where its log and notebook are, and one as it ends, with its speed
        assert re.search(rf'\[\d ended, \d running, \d left\] n{n}_micro_b8_lr1e-3_s0: started; log {re.escape(str(RunDir(d).log_path))}, notebook', r.stdout), r.stdout
        assert re.search(rf'\[\d ended, \d running, \d left\] n{n}_micro_b8_lr1e-3_s0: done \(\d+ s, [\d.e+]+ steps/s\)', r.stdout), r.stdout
        assert RunDir(d).status == 'done'
        src = injected(d/'run.ipynb')
        assert f'n_train = {n}' in src and 'seed = 0' in src and 'sweep = "smoke"' in src and f'run_dir = "{d.resolve()}"' in src, src
        assert [m['step'] for m in metrics_rows(d)] == [20, 43, 60]
        assert RunDir(d).sample_steps() == [20, 43, 60] and RunDir(d).ckpt_path.exists()
        assert 'Executing notebook with kernel: python3' in (d/'log.txt').read_text()
        meta = json.loads((d/'run.ipynb').read_text())['metadata']['papermill']
        assert meta['exception'] is None
        spans.append((meta['start_time'], meta['end_time']))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f'the two cells did not run at the same time: {spans}'
    print(f'smoke sweep, 2 cells with --jobs 2: {secs:.1f} s')


def test_collect_writes_what_analysis_reads(smoke, tmp_path):
    root, _, _ = smoke
    rc, out, err = main('collect', 'smoke', '--root', root, '--out', tmp_path, '--samples', 'last')
    assert rc == 0, err
    from dmstudy.analysis import read_results, summarize
    df = read_results(tmp_path/'smoke.parquet')
    assert sorted(df.N.unique()) == [16, 32] and set(df.sweep) == {'smoke'} and set(df.sweep_axis) == {'N'}
    assert {'loss', 'mem_frac'} <= set(df.metric) and {'train', 'test'} <= set(df.split)
    assert sorted(df[df.metric == 'loss'].step.unique()) == [20, 43, 60]
    assert len(summarize(df)) == 2
    import pandas as pd
    s = pd.read_csv(tmp_path/'smoke_summary.csv')
    assert list(s.status) == ['done', 'done'] and len(s) == 2
    from dmstudy.rundir import RunDir
    assert (tmp_path/'smoke'/'n16_micro_b8_lr1e-3_s0'/RunDir(root).sample_path(60).name).exists()
    rc, out, _ = main('status', 'smoke', '--root', root)
    assert rc == 0 and out.count(' done ') == 2 and 'n32_micro_b8_lr1e-3_s0' in out, out


def test_second_launch_runs_nothing(smoke):
    root, _, _ = smoke
    nbs = sorted(root.glob('smoke/*/run.ipynb'))
    before = [p.stat().st_mtime_ns for p in nbs]
    r = dmstudy_cmd('sweep', 'smoke', '--jobs', 2, '--root', root)
    assert r.returncode == 0 and '2 cells, 0 to run' in r.stdout and r.stdout.count('skipped, done') == 2, r.stdout + r.stderr
    assert [p.stat().st_mtime_ns for p in nbs] == before
    assert not any(p.name.startswith('.') and '.tmp' in p.name for p in root.rglob('*'))  # nothing half-written left


def test_failed_cell_says_why_and_waits_for_retry(tmp_path):
    """A cell whose data file is missing stops the launch before any run directory exists (one sentence naming the file,
    exit code 2). A cell that failed (status `failed: <the error>`, as `train` writes it) is skipped by later launches,
    which still exit 1, until `--retry` runs it again to the end."""
    import numpy as np
    from dmstudy.data import load_digits_arrays
    from dmstudy.rundir import RunDir
    data = tmp_path/'digits.npz'
    sw = write_sweep(tmp_path/'npz.yaml', {'n_train': [16]}, dataset='npz', data_path=str(data))
    d = tmp_path/'runs'/'npz'/'n16_micro_b8_lr1e-3_s0'
    r = dmstudy_cmd('sweep', sw, '--root', tmp_path/'runs')
    assert r.returncode == 2 and 'digits.npz' in r.stderr and 'Traceback' not in r.stderr, r.stdout + r.stderr
    assert not d.exists()
    tx, ty, vx, vy, _ = load_digits_arrays()
    np.savez(data, train_images=tx, train_labels=ty, test_images=vx, test_labels=vy)
    d.mkdir(parents=True); rd = RunDir(d)
    from dmstudy.sweep import sweep_cells
    rd.write_config(sweep_cells(sw, tmp_path/'runs')[0].cfg); rd.write_status('failed: FileNotFoundError: digits.npz was missing')
    rc, out, _ = main('sweep', sw, '--root', tmp_path/'runs')
    assert rc == 1 and '1 cells, 0 to run' in out and '(use --retry to run it again)' in out, out
    rc, out, _ = main('sweep', sw, '--root', tmp_path/'runs', '--retry', '-p', 'show', 'False')
    assert rc == 0 and '1 cells, 1 to run' in out, out
    assert RunDir(d).status == 'done' and [m['step'] for m in metrics_rows(d)] == [20, 43, 60]
    assert 'show = False' in injected(d/'run.ipynb')


def test_misspelled_parameter_or_axis_stops_before_training(tmp_path):
    root = tmp_path/'runs'
    rc, _, err = main('sweep', 'smoke', '-p', 'n_trian', 64, '--root', root)
    assert rc == 2 and "Unknown parameter 'n_trian'" in err and "did you mean 'n_train'" in err, err
    rc, _, err = main('sweep', 'smoke', '-p', 'ema_decay', 0.9, '--root', root)
    assert rc == 2 and "Unknown parameter 'ema_decay'" in err, err  # not a template parameter: --set ema_decay=0.9 is the way
    rc, _, err = main('sweep', 'smoke', '--set', 'emadecay=0.9', '--root', root)
    assert rc == 2 and "did you mean 'ema_decay'" in err, err
    sw = write_sweep(tmp_path/'typo.yaml', {'n_trian': [16, 32]})
    rc, _, err = main('sweep', sw, '--root', root)
    assert rc == 2 and "Unknown sweep axis 'n_trian' in typo.yaml; did you mean 'n_train'?" in err, err
    assert not root.exists()


def test_papermill_alone_stops_at_a_misspelled_parameter(tmp_path):
    "Run by hand with papermill (which only warns), the cell notebook itself stops at an unknown name, before training."
    from dmstudy.sweep import template_path
    r = subprocess.run([sys.executable, '-m', 'papermill', str(template_path()), str(tmp_path/'out.ipynb'), '-p', 'n_trian', '64',
                        '-p', 'run_dir', str(tmp_path/'run'), '-k', 'python3'], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Unknown parameter 'n_trian'" in r.stderr and "did you mean 'n_train'" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path/'run').exists()


def test_killed_cell_resumes_and_ends_identical(tmp_path):
    """A cell killed (SIGKILL to its launcher, papermill and kernel) after its first checkpoint is `interrupted`; while it
    ran, a second launch left it alone; the next launch resumes it, and it ends bitwise equal to a cell that was never
    interrupted."""
    import torch
    from dmstudy.sweep import plan_sweep, run_sweep, sweep_status
    from dmstudy.rundir import RunDir
    sw = write_sweep(tmp_path/'kill.yaml', {'n_train': [16]}, steps=150, eval_steps=[20, 150])
    cell = 'n16_micro_b8_lr1e-3_s0'
    a, b = tmp_path/'a', tmp_path/'b'
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', 'sweep', str(sw), '-p', 'show', 'False']
    ref = subprocess.Popen(cmd + ['--root', str(a)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(cmd + ['--root', str(b)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    d = b/'kill'/cell; rd = RunDir(d)
    try:
        t0 = time.time()
        while not rd.locked():
            assert victim.poll() is None and time.time() - t0 < 300, 'the cell never started'
            time.sleep(0.05)
        # a second launch while the cell runs leaves it alone
        rep = run_sweep(plan_sweep(sw, root=b, params={'show': False}), log=lambda s: None)
        assert [r['outcome'] for r in rep] == ['busy'], rep
        while not rd.ckpt_path.exists():
            assert victim.poll() is None and time.time() - t0 < 300, 'the cell ended before its first checkpoint'
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        victim.wait()
    assert rd.status == 'running'
    assert rd.load_checkpoint()['step'] < 150, 'the kill came after the end of training'
    t0 = time.time()
    while rd.locked():  # the kernel notices its parent is gone within a second and exits
        assert time.time() - t0 < 10; time.sleep(0.1)
    assert sweep_status(sw, root=b).status.tolist() == ['interrupted']
    r = dmstudy_cmd('sweep', sw, '-p', 'show', 'False', '--root', b)
    assert r.returncode == 0 and '1 cells, 1 to run' in r.stdout, r.stdout + r.stderr
    assert 'resuming' in (d/'log.txt').read_text()
    assert ref.wait(300) == 0, ref.stdout.read()
    assert rd.status == RunDir(a/'kill'/cell).status == 'done'
    assert metrics_rows(d) == metrics_rows(a/'kill'/cell)
    s1, s2 = (RunDir(x).load_checkpoint() for x in (d, a/'kill'/cell))
    for k in ('model', 'ema'):
        assert s1[k].keys() == s2[k].keys() and all(torch.equal(s1[k][n], s2[k][n]) for n in s1[k]), k
    for i, st in s1['opt']['state'].items():
        assert all(torch.equal(v, s2['opt']['state'][i][n]) if torch.is_tensor(v) else v == s2['opt']['state'][i][n] for n, v in st.items())
    assert s1['step'] == s2['step'] == 150


def test_template_ships_with_the_package_and_is_skipped_by_nbdev_test():
    from dmstudy.sweep import template_path, template_parameters
    from nbdev.test import nb_test_cells
    p = template_path()
    repo = Path(__file__).parents[1]
    assert p.parent.name == 'templates' and p.resolve() == (repo/'nbs'/'experiments'/'run_cell.ipynb').resolve()
    nb = json.loads(p.read_text())
    assert nb['metadata']['kernelspec']['name'] == 'python3'
    assert any('parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert nb_test_cells(p) == []  # front matter `skip_exec: true`: nbdev-test runs none of its cells
    assert {'sweep', 'config', 'run_dir', 'n_train', 'lr', 'batch_size', 'unet', 'seed', 'steps'} <= set(template_parameters())


def test_killed_kernel_is_interrupted_and_resumed_without_retry(tmp_path):
    """A cell whose kernel is killed with SIGKILL (as the OOM killer does) ends `interrupted`, not `failed`: the next
    launch runs it again without --retry, and it resumes from its checkpoint to the end."""
    from dmstudy.rundir import RunDir
    sw = write_sweep(tmp_path/'oom.yaml', {'n_train': [16]}, steps=150, eval_steps=[20, 150])
    rd = RunDir(tmp_path/'runs'/'oom'/'n16_micro_b8_lr1e-3_s0')
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', 'sweep', str(sw), '-p', 'show', 'False', '--root', str(tmp_path/'runs')]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: rd.ckpt_path.exists(), 'first checkpoint', proc=p)
        kernels = [pid for pid, c in descendants(p.pid) if 'ipykernel' in c]
        assert len(kernels) == 1, descendants(p.pid)
        os.kill(kernels[0], signal.SIGKILL)
        out, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 1 and '0 failed, 1 interrupted' in out, out
    assert rd.status == 'running' and rd.state == 'interrupted', rd.status
    r = dmstudy_cmd('sweep', sw, '-p', 'show', 'False', '--root', tmp_path/'runs')
    assert r.returncode == 0 and '1 cells, 1 to run' in r.stdout, r.stdout + r.stderr
    assert rd.status == 'done' and 'resuming' in rd.log_path.read_text()
    assert [m['step'] for m in metrics_rows(rd.path)] == [20, 150]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_the_sweep_at_a_checkpoint(tmp_path, sig):
    """SIGTERM (or Ctrl-C's SIGINT) to the launcher alone: the running cell is stopped at a checkpoint (its status says so,
    and no process of it is left), the cell not yet started is not started, every cell is reported, the launcher
    says what happened in one line without a traceback and exits non-zero; the next launch finishes both cells."""
    from dmstudy.rundir import RunDir
    sw = write_sweep(tmp_path/'sig.yaml', {'n_train': [16, 32]}, steps=150, eval_steps=[20, 150])  # the signal comes at step 20's checkpoint
    first, second = (RunDir(tmp_path/'runs'/'sig'/f'n{n}_micro_b8_lr1e-3_s0') for n in (16, 32))
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', 'sweep', str(sw), '-p', 'show', 'False', '--root', str(tmp_path/'runs')]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: first.ckpt_path.exists() and 'ipykernel' in ' '.join(c for _, c in descendants(p.pid)), 'first checkpoint', proc=p)
        procs = [pid for pid, _ in descendants(p.pid)]
        p.send_signal(sig)
        out, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode != 0 and 'Traceback' not in out, out
    name = signal.Signals(sig).name
    assert re.search(rf'sig: stopped by {name}: 1 cell\(s\) stopped at a checkpoint, 1 not started; rerun the same command to resume\.', out), out
    assert 'n16_micro_b8_lr1e-3_s0: interrupted' in out and 'n32_micro_b8_lr1e-3_s0: not started' in out, out
    step = first.load_checkpoint()['step']
    assert first.status == f'stopped: SIGTERM at step {step} (resumable)' and second.status == 'new', (first.status, second.status)
    t0 = time.time()
    while any(alive(q) for q in procs):  # papermill and the kernel are gone
        assert time.time() - t0 < 10, [(q, alive(q)) for q in procs]; time.sleep(0.1)
    if sig != signal.SIGTERM: return  # the cell was stopped by SIGTERM either way (its status says so): resuming is the same as below
    r = dmstudy_cmd('sweep', sw, '-p', 'show', 'False', '--root', tmp_path/'runs')
    assert r.returncode == 0 and '2 cells, 2 to run' in r.stdout, r.stdout + r.stderr
    assert first.status == second.status == 'done' and f'resuming {first.path} at step {step}' in first.log_path.read_text()
