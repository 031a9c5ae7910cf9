"Package-level checks that cross process boundaries: imports through the package, the install, the config CLI path."
import os, subprocess, sys, importlib, pickle
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


FASHION_DEBIAN = Path('/usr/share/datasets/fashion-mnist')
IN_CI = os.environ.get('DMSTUDY_CI') == '1'


@pytest.mark.skipif(not IN_CI and not FASHION_DEBIAN.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed; CI (.ci/run) installs it and sets DMSTUDY_CI=1, which makes its absence a failure")
def test_real_fashion_mnist_from_debian(tmp_path):
    "The real Fashion-MNIST, as Debian ships it: its known shapes, first labels and class counts, and every pixel equal to torchvision's reader."
    assert FASHION_DEBIAN.is_dir(), "DMSTUDY_CI=1 but Debian's dataset-fashion-mnist is not installed: apt-get install dataset-fashion-mnist"
    import gzip, shutil
    from dmstudy.data import load_fashion_mnist, check_data
    from dmstudy.config import RunConfig
    tx, ty, vx, vy, classes = load_fashion_mnist(tmp_path)  # nothing under tmp_path: found in Debian's folder
    assert (tx.shape, vx.shape, tx.dtype, len(classes)) == ((60000, 1, 28, 28), (10000, 1, 28, 28), np.uint8, 10)
    assert ty[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5] and vy[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(ty).tolist() == [6000] * 10 and np.bincount(vy).tolist() == [1000] * 10
    from torchvision.datasets.mnist import read_image_file, read_label_file
    for stem, got in (('train-images-idx3-ubyte', tx[:, 0]), ('train-labels-idx1-ubyte', ty), ('t10k-images-idx3-ubyte', vx[:, 0])):
        raw = tmp_path/stem
        with gzip.open(FASHION_DEBIAN/f'{stem}.gz') as f, open(raw, 'wb') as g: shutil.copyfileobj(f, g)
        ref = (read_image_file if 'images' in stem else read_label_file)(str(raw)).numpy()
        np.testing.assert_array_equal(got, ref)
    assert check_data(RunConfig(dataset='fashion-mnist', data_root=str(tmp_path), image_size=32, n_train=60000)) == ((1, 32, 32), 10)
