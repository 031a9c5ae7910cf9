"""The probes inside training: a run that records them resumes to the same rows, a class-conditional network is compared
with the class-conditional empirical denoiser, and the analysis reads and summarizes rows that hold them."""
import math
import torch

from dmstudy.config import RunConfig
from dmstudy.data import load_split, to_model_space
from dmstudy.diffusion import make_objective, EmpiricalDenoiser
from dmstudy.probes import denoiser_gap, emp_denoiser_metrics, probe_metrics
from dmstudy.rundir import RunDir
from dmstudy.train import train
from dmstudy.analysis import load_runs, summarize

CFG = RunConfig(dataset='digits', n_train=16, n_eval=64, unet='micro', class_cond=False, steps=8, eval_steps=(4, 8),
                batch_size=4, lr=1e-3, n_samples=16, n_sw=16, sample_steps=2, loss_eval_n=16, loss_train_n=16, sample_grid=4,
                loss_levels=(0.1, 0.5), metrics=('loss', 'loss_t', 'emp_denoiser', 'rel_dist'), device='cpu')


def strip_times(rows): return [{k: v for k, v in r.items() if 'time' not in k} for r in rows]


def test_a_run_with_probes_resumes_to_the_same_rows_and_the_analysis_reads_them(tmp_path):
    ref = train(CFG, tmp_path/'ref'/'run', quiet=True)
    cut = train(CFG, tmp_path/'cut'/'run', quiet=True, max_steps=4)
    assert cut.step == 4 and cut.status.startswith('stopped')
    cut = train(CFG, tmp_path/'cut'/'run', quiet=True)
    a, b = RunDir(ref.run_dir).read_metrics(), RunDir(cut.run_dir).read_metrics()
    assert [r['step'] for r in a] == [4, 8]
    assert strip_times(a) == strip_times(b)
    assert all(math.isfinite(r['emp_denoiser/0.1/test']) and r['rel_dist_lo'] <= r['rel_dist'] <= r['rel_dist_hi'] for r in a)
    df = load_runs(tmp_path/'ref')
    got = set(zip(df.metric, df.split))
    assert {('emp_denoiser/0.1', 'train'), ('emp_denoiser/0.5', 'test'), ('rel_dist', ''), ('rel_dist_hi', '')} <= got
    s = summarize(df)
    assert len(s) == 1 and s.steps.item() == 8


def test_a_class_conditional_network_is_compared_with_the_class_conditional_optimum():
    cfg = CFG.with_updates(class_cond=True, loss_levels=(0.5, 0.9))
    sp = load_split(cfg)
    obj = make_objective(cfg)
    cond = EmpiricalDenoiser(to_model_space(sp.train_images), obj, sp.train_labels)  # a "network" that is D* itself
    assert cond.num_classes > 0
    assert max(emp_denoiser_metrics(cond, obj, sp, cfg).values()) < 1e-9
    uncond = EmpiricalDenoiser(to_model_space(sp.train_images), obj)
    gap = denoiser_gap(cond.denoise, uncond.denoise, obj, sp.train_images, sp.train_labels, levels=(0.9,))
    assert gap[0.9] > 1e-3  # at high noise the class restriction matters: the measure would see the wrong optimum
    assert probe_metrics(cond, obj, sp, cfg.with_updates(metrics=('loss',))) == {}
