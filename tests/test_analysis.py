"Recovery studies for the analysis rules, and the figures written to disk by a separate, display-less process."
import json, math, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pandas as pd, pytest
from dmstudy.config import RunConfig
from dmstudy.analysis import (load_runs, synthetic_run, tau_mem, memorization_rate, scaling_fit, summarize,
                              save_results, read_results, TIDY_COLUMNS)

def _onsets(n, seed=0, lo=300, hi=20_000):
    return 10 ** np.random.default_rng(seed).uniform(math.log10(lo), math.log10(hi), n)

def _recovery(root, onsets, per_decade=8, **kw):
    "Fraction of runs whose tau_mem lies within one evaluation interval of the planted onset, and whose interval holds it."
    cfg = RunConfig(steps=100_000, eval_per_decade=per_decade, metrics=('loss',))
    for i, o in enumerate(onsets): synthetic_run(root/f'r{i:03d}', onset=o, seed=i, cfg=cfg, samples=False, **kw)
    df = load_runs(root, params=False)
    taus = [tau_mem(g) for _, g in df.groupby('run_dir')]
    iv = math.log(10 ** (1 / per_decade))
    hit = np.mean([t is not None and abs(math.log(t.step / o)) <= iv for t, o in zip(taus, onsets)])
    cov = np.mean([t is not None and t.lo <= o <= t.hi for t, o in zip(taus, onsets)])
    return hit, cov

@pytest.mark.parametrize('growth', [0.5, 1.0])
def test_tau_mem_recovers_onset(tmp_path, growth):
    hit, cov = _recovery(tmp_path, _onsets(100, seed=int(growth * 10)), growth=growth)
    assert hit >= 0.95 and cov >= 0.9, (hit, cov)

def test_tau_mem_coarse_schedule(tmp_path):
    "With 4 evaluations per decade an interval is a factor 1.78: recovery holds there too."
    hit, cov = _recovery(tmp_path, _onsets(100, seed=7), per_decade=4)
    assert hit >= 0.95, hit

def test_tau_mem_none_without_divergence(tmp_path):
    cfg = RunConfig(steps=100_000, metrics=('loss',))
    for i in range(100): synthetic_run(tmp_path/f'r{i:03d}', onset=None, seed=10_000 + i, cfg=cfg, samples=False)
    res = [tau_mem(g) for _, g in load_runs(tmp_path, params=False).groupby('run_dir')]
    assert res.count(None) >= 95, res.count(None)

def test_tau_mem_ignores_constant_offset(tmp_path):
    "A test loss that sits 10% above the train loss from the start is an offset, not a divergence."
    rd = synthetic_run(tmp_path/'r', onset=None, seed=3, samples=False)
    recs = [json.loads(l) for l in (rd/'metrics.jsonl').read_text().splitlines()]
    for r in recs: r['loss/test'] = 1.1 * r['loss/train'] * math.exp(0.01 * math.sin(r['step']))
    (rd/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert tau_mem(rd) is None
    rd2 = synthetic_run(tmp_path/'r2', onset=5000, seed=3, samples=False)  # an offset plus a real divergence
    recs = [json.loads(l) for l in (rd2/'metrics.jsonl').read_text().splitlines()]
    for r in recs: r['loss/test'] *= 1.1
    (rd2/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    t = tau_mem(rd2)
    assert t is not None and abs(math.log10(t.step / 5000)) <= 1 / 8, t

def test_memorization_rate_per_decade(tmp_path):
    "The planted rate per decade comes back, and rescaling time (a batch-size sweep) leaves it unchanged."
    cfg = RunConfig(steps=1_000_000, metrics=('loss', 'mem_frac'))
    rates = [memorization_rate(synthetic_run(tmp_path/f'r{o}', onset=o, seed=1, cfg=cfg, mem_rate=0.4, samples=False)) for o in (1000, 8000)]
    for r in rates: assert r.lo <= 0.4 <= r.hi and abs(r.rate - 0.4) < 0.04, r
    assert abs(rates[0].rate - rates[1].rate) < 0.05

def test_scaling_fit_planted_exponent():
    "Over 100 noise draws the fitted exponent is within 1 ± 0.05 in at least 95% of them."
    N = np.repeat([2048, 4096, 8192, 16384], 5)
    ks = [scaling_fit(pd.DataFrame(dict(N=N, tau_mem=2.0 * N * np.exp(0.05 * np.random.default_rng(i).standard_normal(len(N)))))).exponent
          for i in range(100)]
    assert np.mean(np.abs(np.array(ks) - 1) <= 0.05) >= 0.95
    k2 = scaling_fit(pd.DataFrame(dict(N=N, tau_mem=N ** 1.5))).exponent
    assert abs(k2 - 1.5) < 1e-9

def test_results_roundtrip(tmp_path):
    for n in (512, 2048): synthetic_run(tmp_path/'runs'/'sw'/f'n{n}', onset=3 * n, seed=n, cfg=RunConfig(n_train=n, steps=50_000), samples=False)
    df = load_runs(tmp_path/'runs')
    back = read_results(save_results(df, tmp_path/'results'/'sw.parquet'))
    assert list(back.columns) == TIDY_COLUMNS
    pd.testing.assert_frame_equal(summarize(back), summarize(df))

def test_panels_png_headless(tmp_path):
    "A fresh process with the Agg backend draws the panels of a tiny run and the other figures to PNG files."
    synthetic_run(tmp_path/'sweep'/'n256', onset=2000, seed=0, cfg=RunConfig(n_train=256, steps=20_000, sample_grid=16))
    code = textwrap.dedent(f"""
        import matplotlib; matplotlib.use('Agg')
        from dmstudy.analysis import load_runs
        from dmstudy.plots import panels, sample_strip
        df = load_runs({str(tmp_path/'sweep')!r})
        panels(df, 'N').savefig({str(tmp_path/'panels.png')!r}, dpi=80)
        sample_strip({str(tmp_path/'sweep'/'n256')!r}).savefig({str(tmp_path/'strip.png')!r}, dpi=80)
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    for name, kb in (('panels.png', 20), ('strip.png', 3)):
        p = tmp_path/name
        assert p.stat().st_size > kb * 1000, (name, p.stat().st_size)
        a = np.asarray(Image.open(p).convert('L'))
        assert a.std() > 20 and (a < 200).mean() > 0.02, name
