"Training across processes: exact resume after SIGKILL, failure status and exit code, through the `dmstudy run` command."
import os, signal, subprocess, sys, time, random
from pathlib import Path
import pytest
import torch

from dmstudy.config import RunConfig
from dmstudy.train import load_checkpoint, read_metrics, read_status

CFG = RunConfig(n_train=16, unet='micro', steps=300, batch_size=8, lr=1e-3, eval_first=20, eval_per_decade=6,
                n_samples=16, sample_steps=8, sample_grid=16, metrics=('loss', 'mem_frac', 'nn_dist'), loss_eval_n=32,
                device='cpu')


def run_cmd(cfg_path, run_dir, **kw):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-m', 'dmstudy.cli', 'run', str(cfg_path), '--run-dir', str(run_dir), '--quiet'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def strip_times(rows): return [{k: v for k, v in r.items() if 'time' not in k} for r in rows]


def assert_same_state(a, b):
    sa, sb = load_checkpoint(Path(a)/'ckpt'/'latest.pt'), load_checkpoint(Path(b)/'ckpt'/'latest.pt')
    assert sa['step'] == sb['step'] == CFG.steps
    for part in ('model', 'ema'):
        for k in sa[part]: assert torch.equal(sa[part][k], sb[part][k]), f'{part}.{k} differs'
    oa, ob = sa['opt']['state'], sb['opt']['state']
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]: assert torch.equal(oa[i][k], ob[i][k]), f'opt state {i}.{k} differs'


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    cfg_path = tmp_path/'cfg.yaml'; cfg_path.write_text(CFG.to_yaml())
    ref, cut = tmp_path/'ref', tmp_path/'cut'
    p = run_cmd(cfg_path, ref); out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    p = run_cmd(cfg_path, cut)
    ckpt = cut/'ckpt'/'latest.pt'
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    assert p.poll() is None, 'the run ended before it could be killed'
    time.sleep(random.Random(0).uniform(0.2, 1.5))
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = load_checkpoint(ckpt)['step']
    assert killed_at < CFG.steps and read_status(cut) == 'running'
    p = run_cmd(cfg_path, cut); out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert 'resuming' in out
    assert read_status(cut) == 'done'
    assert_same_state(ref, cut)
    assert strip_times(read_metrics(ref)) == strip_times(read_metrics(cut))


def test_sigterm_checkpoints_and_resumes(tmp_path):
    cfg_path = tmp_path/'cfg.yaml'; cfg_path.write_text(CFG.to_yaml())
    d = tmp_path/'run'
    p = run_cmd(cfg_path, d)
    while not (d/'ckpt'/'latest.pt').exists() and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGTERM); out, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and 'checkpoint written' in out, out
    assert read_status(d) == 'running'
    p = run_cmd(cfg_path, d); out, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and read_status(d) == 'done', out


def test_nonfinite_loss_fails_with_status_and_exit_code(tmp_path):
    bad = CFG.with_updates(lr=1e12, optimizer='sgd', momentum=0.0, eval_steps=(1,), steps=100)
    cfg_path = tmp_path/'bad.yaml'; cfg_path.write_text(bad.to_yaml())
    p = run_cmd(cfg_path, tmp_path/'run'); out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert read_status(tmp_path/'run').startswith('failed: non-finite loss'), out
    assert 'failed' in out
    st = load_checkpoint(tmp_path/'run'/'ckpt'/'latest.pt')
    assert st['step'] == 1 and all(torch.isfinite(v).all() for v in st['model'].values() if v.is_floating_point())


def test_different_config_in_same_dir_is_refused(tmp_path):
    cfg_path = tmp_path/'cfg.yaml'; cfg_path.write_text(CFG.with_updates(steps=20, eval_steps=(20,)).to_yaml())
    p = run_cmd(cfg_path, tmp_path/'run'); p.communicate(timeout=300); assert p.returncode == 0
    cfg_path.write_text(CFG.with_updates(steps=20, eval_steps=(20,), lr=4e-4).to_yaml())
    p = run_cmd(cfg_path, tmp_path/'run'); out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and 'different config' in out and 'lr' in out
