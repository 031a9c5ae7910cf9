"Package-level checks that cross process boundaries: imports through the package, the install, the config CLI path."
import subprocess, sys, importlib, pickle
from pathlib import Path
import numpy as np
import pytest


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)


def test_torchvision_and_torch_fidelity_import_through_the_package():
    "A fresh interpreter imports torchvision and torch_fidelity after dmstudy, whatever torchvision's compiled ops do."
    r = run_py("import dmstudy.data, torchvision, torch_fidelity; "
               "from torchvision.datasets import CIFAR10; import torchvision.transforms.v2 as T; print('ok', torchvision.__version__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('ok')


def test_guard_acts_exactly_when_the_extension_cannot_load():
    "The guard declares op schemas only when torchvision's `_C` fails to load, and is a no-op once torchvision is imported."
    r = run_py("import dmstudy.compat as c, torchvision; print(c._GUARD_ACTED, c._extension_loads(), c.ensure_torchvision())")
    assert r.returncode == 0, r.stderr
    acted, loads, again = r.stdout.split()
    assert acted == str(loads == 'False') and again == 'False'


def test_public_imports():
    r = run_py("from dmstudy.data import load_split; from dmstudy.config import RunConfig; print(RunConfig().n_train)")
    assert r.returncode == 0, r.stderr


def test_cifar_first_and_balanced_from_official_pickles(tmp_path):
    "The paper's subset rule on CIFAR-format files written here: exact first 64 images and labels; balanced 6 or 7 per class."
    from dmstudy.data import write_cifar10_like, load_split
    from dmstudy.config import RunConfig
    ref_x, ref_y = write_cifar10_like(tmp_path, n_per_batch=40, n_test=50, seed=3)
    cfg = RunConfig(dataset='cifar10', data_root=str(tmp_path), n_train=64, image_size=None, download=False, device='cpu')
    s = load_split(cfg)
    np.testing.assert_array_equal(s.train_images.numpy(), ref_x[:64])
    np.testing.assert_array_equal(s.train_labels.numpy(), ref_y[:64])
    # the raw pickle rows, read independently: image 45 is row 5 of the second batch, channel-major
    with open(tmp_path/'cifar-10-batches-py'/'data_batch_2', 'rb') as f: d = pickle.load(f, encoding='bytes')
    np.testing.assert_array_equal(s.train_images[45].numpy().reshape(-1), d[b'data'][5])
    assert s.train_labels[45].item() == d[b'labels'][5]
    b = load_split(cfg.with_updates(subset='balanced'))
    counts = np.bincount(b.train_labels.numpy(), minlength=10)
    assert sorted(set(counts.tolist())) == [6, 7] and counts.sum() == 64 and counts[:4].tolist() == [7] * 4
    assert (np.diff(b.train_indices.numpy()) > 0).all()


def test_missing_cifar_offline_says_where_to_put_it(tmp_path):
    from dmstudy.data import load_split
    from dmstudy.config import RunConfig
    with pytest.raises(FileNotFoundError, match='cifar-10-batches-py'):
        load_split(RunConfig(dataset='cifar10', data_root=str(tmp_path), download=False, n_train=8))


def test_unknown_config_key_names_the_closest():
    from dmstudy.config import RunConfig
    with pytest.raises(KeyError, match="did you mean 'batch_size'"):
        RunConfig.from_dict({'batchsize': 8})
