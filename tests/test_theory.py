"Checks of dmstudy.theory that concern what the report reads: the stored table and the trained-model criterion."
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dmstudy.theory import (kde_bandwidth, relative_distance, transition_experiment, transition_point,
                            theory_table, save_theory_table)

ROOT = Path(__file__).resolve().parents[1]
COLS = {'experiment', 'reference', 'd', 'n_side', 'T', 'lam', 'lam_factor', 'm', 's', 'n_pop', 'N', 'seeds', 'n_general',
        'p_general', 'p_lo', 'p_hi', 'hellinger', 'hell_lo', 'hell_hi', 'hellinger_limit', 'delta_median', 'eps_train',
        'eps_pop'}


def test_stored_table_has_the_schema_and_the_transition():
    df = pd.read_parquet(ROOT / 'results' / 'theory.parquet')
    assert COLS <= set(df.columns)
    assert set(df.experiment) == {'default', 'sweep'} and set(df.reference) == {'sample', 'law', 'smoothed'}
    d0 = df[df.experiment == 'default'].sort_values('N')
    assert d0.p_general.iloc[0] < 0.2 and d0.p_general.iloc[-1] > 0.8
    assert ((d0.p_lo <= d0.p_general) & (d0.p_general <= d0.p_hi)).all()
    tp = transition_point(d0, n_boot=20)
    assert tp.bracketed.item() and d0.N.min() < tp.n_star.item() < d0.N.max()


def test_table_round_trip(tmp_path):
    df = theory_table(ds=(4,), lam_factors=(1.0,), references=('law',), Ns=(3, 8, 20), seeds=8, default=False)
    p = save_theory_table(df, tmp_path / 'sub' / 'theory.parquet')
    pd.testing.assert_frame_equal(pd.read_parquet(p), df)
    assert not list(p.parent.glob('.*tmp*'))


def test_experiment_is_seeded_and_restores_threads():
    n = torch.get_num_threads()
    a = transition_experiment(d=9, Ns=(6, 20), seeds=10, n_pop=128, seed=3)
    b = transition_experiment(d=9, Ns=(6, 20), seeds=10, n_pop=128, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert torch.get_num_threads() == n
    with pytest.raises(ValueError, match='not one of'): transition_experiment(d=9, Ns=(6,), reference='exact')


def test_relative_distance_is_the_same_in_uint8_and_model_space():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (400, 1, 6, 6), generator=g, dtype=torch.uint8)
    samples, train, heldout = imgs[:50], imgs[50:150], imgs[150:]
    r8 = relative_distance(samples, train, heldout, n_boot=50)
    rm = relative_distance(samples.double() / 127.5 - 1, train.double() / 127.5 - 1, heldout.double() / 127.5 - 1, n_boot=50)
    assert math.isclose(r8['rel'], rm['rel'], rel_tol=1e-9) and r8['general'] == rm['general']
    assert r8['eps_heldout'] == r8['eps_train'] == pytest.approx(kde_bandwidth(100, 36, r8['s']))
    with pytest.raises(ValueError, match='heldout_width'): relative_distance(samples, train, heldout, heldout_width='wide')
    with pytest.raises(ValueError, match='constant'): relative_distance(samples, torch.zeros(5, 36), heldout)
