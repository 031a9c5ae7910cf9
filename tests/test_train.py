"""Training across processes, through the `dmstudy run` command: exact resume after SIGKILL, SIGTERM (also during an
evaluation), failure status and exit code, the run directory's lock, a finished run that lost its checkpoint, a full disk."""
import errno, json, os, re, signal, subprocess, sys, time, random
from pathlib import Path
import pytest
import torch

from dmstudy.config import RunConfig
from dmstudy.rundir import RunDir

CFG = RunConfig(n_train=16, unet='micro', steps=300, batch_size=8, lr=1e-3, eval_first=20, eval_per_decade=6,
                n_samples=16, sample_steps=8, sample_grid=16, metrics=('loss', 'mem_frac', 'nn_dist'), loss_eval_n=32,
                device='cpu')
SHORT = CFG.with_updates(steps=40, eval_steps=(20, 40))


def run_cmd(cfg, run_dir, *extra, **kw):
    "Start `dmstudy run CFG.yaml --run-dir RUN_DIR --quiet` (the config written beside the run directory)."
    cfg_path = Path(str(run_dir) + '.yaml')
    if isinstance(cfg, RunConfig): cfg_path.write_text(cfg.to_yaml())
    else: cfg_path = Path(cfg)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-m', 'dmstudy.cli', 'run', str(cfg_path), '--run-dir', str(run_dir), '--quiet', *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def finish(p, timeout=600) -> str:
    out, _ = p.communicate(timeout=timeout); return out


def strip_times(rows): return [{k: v for k, v in r.items() if 'time' not in k} for r in rows]


def wait_for(cond, p, what, timeout=300):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, f"the run ended before {what}: {p.stdout.read()}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def assert_same_state(a, b, steps=CFG.steps):
    sa, sb = RunDir(a).load_checkpoint(), RunDir(b).load_checkpoint()
    assert sa['step'] == sb['step'] == steps
    for part in ('model', 'ema'):
        for k in sa[part]: assert torch.equal(sa[part][k], sb[part][k]), f'{part}.{k} differs'
    oa, ob = sa['opt']['state'], sb['opt']['state']
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]: assert torch.equal(oa[i][k], ob[i][k]), f'opt state {i}.{k} differs'


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref, cut = RunDir(tmp_path/'ref'), RunDir(tmp_path/'cut')
    r = run_cmd(CFG, ref.path)  # the reference trains meanwhile (one thread each: the same numbers)
    p = run_cmd(CFG, cut.path)
    wait_for(lambda: cut.ckpt_path.exists(), p, 'the first checkpoint')
    time.sleep(random.Random(0).uniform(0.2, 1.5))
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = cut.load_checkpoint()['step']
    assert killed_at < CFG.steps and cut.status == 'running' and cut.state == 'interrupted'
    out = finish(r)
    assert r.returncode == 0, out
    p = run_cmd(CFG, cut.path); out = finish(p)
    assert p.returncode == 0, out
    assert 'resuming' in out
    assert cut.status == 'done'
    assert_same_state(ref.path, cut.path)
    assert strip_times(ref.read_metrics()) == strip_times(cut.read_metrics())


def test_sigterm_checkpoints_says_stopped_and_resumes(tmp_path):
    rd = RunDir(tmp_path/'run')
    p = run_cmd(CFG, rd.path)
    wait_for(lambda: rd.ckpt_path.exists(), p, 'the first checkpoint')
    p.send_signal(signal.SIGTERM); out = finish(p, 120)
    assert p.returncode != 0 and 'checkpoint written' in out, out
    step = rd.load_checkpoint()['step']
    assert rd.status == f'stopped: SIGTERM at step {step} (resumable)', (rd.status, out)
    p = run_cmd(CFG, rd.path); out = finish(p)
    assert p.returncode == 0 and rd.status == 'done', out


# `dmstudy run` with the network slowed down, and counted, inside its evaluations only: each network evaluation that
# `train`'s call of `evaluate` makes appends a byte to COUNT_FILE, then sleeps DELAY seconds. Sleeping changes no number,
# so such a run is bitwise identical to a plain one, and its evaluations last at least (calls per evaluation) * DELAY s.
SLOW_EVAL = """import sys, time
from pathlib import Path
import dmstudy.train
from dmstudy.unet import UNet
count_file, delay = Path(sys.argv.pop(1)), float(sys.argv.pop(1))
inside, evaluate, forward = [False], dmstudy.train.evaluate, UNet.forward
def evaluating(*a, **kw):
    inside[0] = True
    try: return evaluate(*a, **kw)
    finally: inside[0] = False
def counted(self, *a, **kw):
    if inside[0]:
        with count_file.open('ab') as f: f.write(b'.')
        time.sleep(delay)
    return forward(self, *a, **kw)
dmstudy.train.evaluate, UNet.forward = evaluating, counted
from dmstudy.cli import main
sys.exit(main())
"""


def slow_eval_cmd(cfg, run_dir, count_file, delay):
    "`run_cmd` through SLOW_EVAL: evaluations take `delay` seconds more per network evaluation, counted in `count_file`."
    cfg_path = Path(str(run_dir) + '.yaml'); cfg_path.write_text(cfg.to_yaml())
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-c', SLOW_EVAL, str(count_file), str(delay), 'run', str(cfg_path), '--run-dir', str(run_dir), '--quiet'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_sigterm_during_a_slow_evaluation_is_honoured_at_once(tmp_path):
    """A run whose evaluation is slow (each network evaluation of it takes a second longer) stops within a small fraction
    of that evaluation's length: the evaluation is abandoned (no row), the training state is checkpointed, the status
    says stopped; the resumed run evaluates that step again and ends identical to a run that was never stopped."""
    cfg = CFG.with_updates(steps=40, eval_steps=(20, 40), sample_steps=40, metrics=('loss', 'mem_frac'))
    delay = 1.0
    ref, cut = RunDir(tmp_path/'ref'), RunDir(tmp_path/'cut')
    r = run_cmd(cfg, ref.path)  # the reference trains meanwhile
    slow_calls = tmp_path/'slow.calls'
    p = slow_eval_cmd(cfg, cut.path, slow_calls, delay)
    # the evaluation at step 20 begins right after its 20 training steps: wait until it is a few network evaluations in
    wait_for(lambda: slow_calls.exists() and slow_calls.stat().st_size >= 4, p, 'the evaluation at step 20')
    assert not cut.read_metrics(), 'the evaluation ended before the signal'
    t0 = time.monotonic(); p.send_signal(signal.SIGTERM); stopped = finish(p, 600); stop_s = time.monotonic() - t0
    assert p.returncode != 0, stopped
    assert cut.read_metrics() == [] and cut.status == 'stopped: SIGTERM at step 20 (resumable)', (cut.status, stopped)
    assert cut.load_checkpoint()['step'] == 20
    out = finish(r)
    assert r.returncode == 0, out
    # resumed without the delay, counting the network evaluations of its two evaluations (steps 20 and 40)
    calls = tmp_path/'resumed.calls'
    p = slow_eval_cmd(cfg, cut.path, calls, 0); out = finish(p)
    assert p.returncode == 0 and cut.status == 'done', out
    eval_s = calls.stat().st_size / 2 * delay  # the least an evaluation of the slowed run lasts
    assert eval_s >= 30, f'an evaluation makes only {eval_s / delay:.0f} network evaluations; make it longer'
    assert stop_s < eval_s / 3, f'stopping took {stop_s:.1f} s, an evaluation at least {eval_s:.1f} s:\n{stopped}'
    assert strip_times(ref.read_metrics()) == strip_times(cut.read_metrics())
    assert_same_state(ref.path, cut.path, 40)


def test_nonfinite_loss_fails_with_status_exit_code_and_the_checkpoint_it_has(tmp_path):
    bad = CFG.with_updates(lr=1e12, optimizer='sgd', momentum=0.0, eval_steps=(1,), steps=100)
    rd = RunDir(tmp_path/'run')
    p = run_cmd(bad, rd.path); out = finish(p, 300)
    assert p.returncode != 0
    assert rd.status.startswith('failed: non-finite'), out
    st = rd.load_checkpoint()
    assert f"its last checkpoint, from a finite model, is at step {st['step']}" in out, out
    assert st['step'] == 1 and all(torch.isfinite(v).all() for v in st['model'].values() if v.is_floating_point())


def test_divergence_before_the_first_evaluation_says_no_checkpoint_exists(tmp_path):
    bad = CFG.with_updates(lr=1e12, optimizer='sgd', momentum=0.0, eval_steps=(60,), steps=100)
    rd = RunDir(tmp_path/'run')
    p = run_cmd(bad, rd.path); out = finish(p, 300)
    assert p.returncode != 0 and rd.status.startswith('failed: non-finite'), out
    assert not rd.ckpt_path.exists()
    assert 'no checkpoint was written' in out and 'last good checkpoint' not in out, out


def test_a_checkpoint_is_never_written_from_a_nonfinite_model(tmp_path):
    """With an evaluation at step 1 and a learning rate that blows the model up in that step (its evaluation loss is
    infinite), nothing of it is kept, and the message says that no checkpoint exists."""
    bad = CFG.with_updates(lr=1e38, optimizer='sgd', momentum=0.0, eval_steps=(1,), steps=100)
    rd = RunDir(tmp_path/'run')
    p = run_cmd(bad, rd.path); out = finish(p, 300)
    assert p.returncode != 0 and rd.status.startswith('failed: non-finite'), out
    if rd.ckpt_path.exists():
        st = rd.load_checkpoint()
        for part in ('model', 'ema'):
            assert all(torch.isfinite(v).all() for v in st[part].values() if v.is_floating_point()), f'{part} of step {st["step"]} is not finite'
    assert 'no checkpoint was written' in out, out


def test_different_config_in_same_dir_is_refused(tmp_path):
    rd = tmp_path/'run'
    p = run_cmd(SHORT.with_updates(steps=20, eval_steps=(20,)), rd); finish(p, 300); assert p.returncode == 0
    p = run_cmd(SHORT.with_updates(steps=20, eval_steps=(20,), lr=4e-4), rd); out = finish(p, 300)
    assert p.returncode != 0 and 'different config' in out and 'lr' in out


def test_done_run_without_its_checkpoint_is_refused_not_wiped(tmp_path):
    """A finished run whose checkpoint went missing is never retrained or truncated: the command refuses in one sentence
    that names what is missing and how to start over; `--restart` moves the old run aside and trains a new one."""
    rd = RunDir(tmp_path/'run')
    p = run_cmd(SHORT, rd.path); out = finish(p, 300); assert p.returncode == 0, out
    rows = rd.read_metrics(); assert [r['step'] for r in rows] == [20, 40]
    rd.ckpt_path.unlink()
    p = run_cmd(SHORT, rd.path); out = finish(p, 300)
    assert p.returncode != 0, out
    assert str(rd.ckpt_path) in out and '--restart' in out and 'Traceback' not in out, out
    assert rd.read_metrics() == rows and rd.status == 'done'
    p = run_cmd(SHORT, rd.path, '--restart'); out = finish(p, 300)
    assert p.returncode == 0 and rd.status == 'done', out
    old = [RunDir(d) for d in tmp_path.glob('run.old-*')]
    assert len(old) == 1 and old[0].read_metrics() == rows and old[0].status == 'done', out
    assert strip_times(rd.read_metrics()) == strip_times(rows)


def test_metrics_beyond_the_checkpoint_are_refused(tmp_path):
    """A checkpoint older than the metrics (e.g. restored from a backup) is refused too, naming the step it covers; only
    the one row a kill between an evaluation's row and its checkpoint can leave is dropped (and evaluated again)."""
    cfg = SHORT.with_updates(eval_steps=(10, 20, 40), snapshot_steps=(10, 20))
    rd = RunDir(tmp_path/'run')
    p = run_cmd(cfg, rd.path); finish(p, 300); assert p.returncode == 0
    rows = rd.read_metrics()
    os.replace(rd.snapshot_path(10), rd.ckpt_path); rd.write_status('running')
    p = run_cmd(cfg, rd.path); out = finish(p, 300)
    assert p.returncode != 0 and 'covers only step 10' in out and '--restart' in out, out
    assert rd.read_metrics() == rows
    rd.write_metrics(rows[:2])  # as if killed after writing the row of step 20, before its checkpoint
    p = run_cmd(cfg, rd.path); out = finish(p, 300)
    assert p.returncode == 0 and rd.status == 'done', out
    assert strip_times(rd.read_metrics()) == strip_times(rows)


def test_second_run_in_the_same_directory_is_refused(tmp_path):
    rd = RunDir(tmp_path/'run')
    first = run_cmd(CFG, rd.path)
    try:
        wait_for(lambda: rd.status == 'running', first, 'the start of training')
        second = run_cmd(CFG, rd.path); out = finish(second, 300)
        assert second.returncode != 0 and f'is in use by process {first.pid}' in out and 'Traceback' not in out, out
    finally:
        first.send_signal(signal.SIGTERM); finish(first, 300)
    steps = [r['step'] for r in rd.read_metrics()]
    assert len(steps) == len(set(steps)), steps


def test_full_disk_says_so_leaves_no_temporary_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    "The second checkpoint write fails with ENOSPC half-way: one sentence, no `.tmp` file, the first checkpoint loads, and the run resumes."
    from dmstudy.train import train
    rd = RunDir(tmp_path/'run')
    threads = torch.get_num_threads(); torch.set_num_threads(1)  # like the runs above: one thread is fastest on a shared machine
    real_save, calls = torch.save, []
    def full_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) < 2: return real_save(obj, f, *a, **kw)
        (f.write if hasattr(f, 'write') else open(f, 'wb').write)(b'\0' * 4096)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError) as e: train(SHORT, rd.path, quiet=True)
    monkeypatch.setattr(torch, 'save', real_save)
    msg = str(e.value)
    assert msg.startswith('The disk is full') and str(rd.ckpt_path) in msg, msg
    assert not [p for p in rd.path.rglob('*') if '.tmp' in p.name], list(rd.path.rglob('*'))
    assert rd.load_checkpoint()['step'] == 20
    try: r = train(SHORT, rd.path, quiet=True)
    finally: torch.set_num_threads(threads)
    assert r.status == 'done' and [m['step'] for m in rd.read_metrics()] == [20, 40]
