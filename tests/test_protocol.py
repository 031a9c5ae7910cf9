"The paper's protocol at launch: a paper sweep needs CIFAR-10 and the SSCD weights, and says so before anything is written."
import os, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).parents[1]


def dmstudy(*args, env:dict, cwd) -> subprocess.CompletedProcess:
    "The real `dmstudy` command line (this interpreter, this checkout's package) in `cwd`."
    cmd = [sys.executable, '-c', 'import sys; from dmstudy.cli import main; sys.exit(main())', *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, 'PYTHONPATH': str(ROOT), **env})


@pytest.fixture
def bare_machine(tmp_path):
    "A machine without CIFAR-10, the SSCD weights or a network: empty data and weights folders, downloads refused by a dead proxy."
    for d in ('data', 'sscd', 'torch', 'runs'): (tmp_path/d).mkdir()
    (tmp_path/'runs').rmdir()
    dead = 'http://127.0.0.1:9'  # the discard port: nothing listens, so every download fails at once
    env = dict(DMSTUDY_DATA=str(tmp_path/'data'), DMSTUDY_SSCD=str(tmp_path/'sscd'), TORCH_HOME=str(tmp_path/'torch'),
               DMSTUDY_RUNS=str(tmp_path/'runs'), HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, NO_PROXY='', no_proxy='')
    return tmp_path, env


@pytest.mark.parametrize('sweep, executor', [('paper-dataset-size', 'local'), ('paper-model-size-ddpm', 'slurm')])
def test_paper_sweep_refuses_to_launch_without_its_files(bare_machine, sweep, executor):
    "One sentence per missing file (CIFAR-10, SSCD) naming it and where it goes; exit code 2; no run directory, no sweep folder."
    tmp, env = bare_machine
    r = dmstudy('sweep', sweep, '--executor', executor, env=env, cwd=tmp)
    print(f"$ dmstudy sweep {sweep} --executor {executor}\n{r.stdout}{r.stderr}exit code {r.returncode}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr
    lines = [l.removeprefix('dmstudy sweep: error: ') for l in r.stderr.strip().splitlines()]
    assert len(lines) == 2, lines
    cifar, sscd = lines
    assert 'CIFAR-10 is not in' in cifar and str(tmp/'data'/'cifar-10-batches-py') in cifar and 'cifar-10-python.tar.gz' in cifar and 'DMSTUDY_DATA' in cifar
    assert 'sscd_disc_mixup.torchscript.pt' in sscd and '$DMSTUDY_SSCD' in sscd and str(tmp/'sscd'/'sscd_disc_mixup.torchscript.pt') in sscd
    assert not (tmp/'runs').exists() and not (tmp/'runs'/sweep).exists()
    assert sorted(p.name for p in tmp.iterdir()) == ['data', 'sscd', 'torch']
    assert not any((tmp/'data').iterdir()) and not any((tmp/'sscd').iterdir())


def test_the_same_sweep_with_its_files_goes_past_the_check(bare_machine):
    "With a CIFAR-10-format data set and an SSCD file in place, the launch check is silent (a dry run prices every cell)."
    tmp, env = bare_machine
    from dmstudy.data import write_cifar10_like
    write_cifar10_like(tmp/'data', n_per_batch=20)
    (tmp/'sscd'/'sscd_disc_mixup.torchscript.pt').write_bytes(b'stand-in')
    from dmstudy.config import RunConfig
    from dmstudy.sweep import missing_files, sweep_cells
    cfg = sweep_cells('paper-dataset-size')[0].cfg.with_updates(n_train=16, data_root=str(tmp/'data'), sscd_path=str(tmp/'sscd'/'sscd_disc_mixup.torchscript.pt'))
    assert missing_files(cfg) == []
    assert missing_files(cfg.with_updates(metrics=('loss',), sscd_path=str(tmp/'none.pt'))) == []  # no copy score listed: no SSCD needed
    r = dmstudy('sweep', 'paper-dataset-size', '--dry-run', env=env, cwd=tmp)
    assert r.returncode == 0 and 'n16384_p93m_b16_lr1e-4_s0' in r.stdout, r.stdout + r.stderr
    assert not (tmp/'runs').exists()


def test_label_dropout_trains_the_null_class_and_guidance_samples_with_it(tmp_path):
    "With label dropout the U-Net learns a null-label row (Adam has moved it), a guided evaluation runs; without, the table is the preset's."
    from dmstudy.config import RunConfig
    from dmstudy.rundir import RunDir
    from dmstudy.train import train
    from dmstudy.unet import build_unet
    base = RunConfig(n_train=16, unet='micro', steps=12, batch_size=8, lr=1e-3, eval_steps=(12,), n_samples=4, sample_steps=2,
                     sample_grid=4, metrics=('loss', 'mem_frac'), loss_eval_n=8, loss_levels=(0.5,), device='cpu')
    for cfg, rows in ((base.with_updates(label_dropout=0.5, guidance=1.0), 11), (base, 10)):
        d = tmp_path/f'rows{rows}'
        r = train(cfg, d)
        assert r.status == 'done' and 'mem_frac' in r.metrics, r
        ck = RunDir(d).load_checkpoint()
        assert ck['model']['label_emb.weight'].shape[0] == rows
        names = [n for n, _ in build_unet(cfg, (1, 16, 16), 10).named_parameters()]
        m = ck['opt']['state'][names.index('label_emb.weight')]['exp_avg']
        if rows == 11: assert m[10].abs().sum() > 0  # the null row: moved by the dropped labels
