"Bad input through the installed `dmstudy` command: one sentence on stderr, no traceback, exit code != 0, nothing created."
import hashlib, os, pickle, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def dmstudy(*args, cwd, env=None):
    "Run `python -m dmstudy.cli` (what the `dmstudy` script runs) in `cwd`, with runs and data under `cwd`."
    e = {**os.environ, 'PYTHONPATH': str(ROOT), 'DMSTUDY_RUNS': str(Path(cwd)/'runs'), 'DMSTUDY_DATA': str(Path(cwd)/'data'), **(env or {})}
    return subprocess.run([sys.executable, '-m', 'dmstudy.cli', *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def tree(d) -> set:
    return {str(p.relative_to(d)) for p in Path(d).rglob('*')}


def refused(r, *wanted):
    "The command failed with exit code 2 and one line on stderr that holds every `wanted` text."
    err = r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-2000:])
    assert 'Traceback' not in err and err.count('\n') == 1 and err.startswith('dmstudy '), err
    for w in wanted: assert w in err, (w, err)
    return err


BAD_SETS = [
    ('warmup_steps=-3', 'RunConfig.warmup_steps must be a non-negative integer, got -3.'),
    ('sample_steps=0', 'RunConfig.sample_steps must be a positive integer or null, got 0.'),
    ('n_train=1', 'RunConfig.n_train must be at least 2'),
    ('n_train=true', "RunConfig.n_train (in --set) must be an integer, got 'true'."),
    ('lr=abc', "RunConfig.lr (in --set) must be a finite number, got 'abc'."),
    ('ema_decay=abc', "RunConfig.ema_decay (in --set) must be a finite number, got 'abc'."),
    ('adam_betas=abc', "RunConfig.adam_betas (in --set) needs 2 values, like [0.9, 0.999], got 'abc'."),
    ('image_size=15', 'Image size 15 is not divisible by 4, as 3 U-Net levels need; set RunConfig.image_size to a multiple of 4, e.g. 16.'),
    ('n_train=5000', 'n_train=5000 is larger than the 1297 training images of digits; choose n_train <= 1297.'),
    ('unet=huge', "Unknown U-Net preset 'huge'; choose one of"),
    ('dropout=2', "RunConfig.dropout must be in [0, 1), or null for the preset's own, got 2.0."),
    ('seed=-1', 'RunConfig.seed must be an integer in [0, 2**32), got -1.'),
    ('dataset=npz', "dataset='npz' needs RunConfig.data_path"),
    ('n_trian=64', "Unknown RunConfig field 'n_trian' in --set; did you mean 'n_train'?"),
]


@pytest.mark.parametrize('kv,msg', BAD_SETS, ids=[kv for kv, _ in BAD_SETS])
def test_bad_value_is_one_sentence_and_creates_nothing(tmp_path, kv, msg):
    r = dmstudy('run', '--set', kv, cwd=tmp_path)
    refused(r, msg)
    assert tree(tmp_path) == set()


def test_device_this_machine_lacks(tmp_path):
    dev = 'cuda:99' if torch.cuda.is_available() else 'cuda'
    refused(dmstudy('run', '--set', f'device={dev}', cwd=tmp_path), f"RunConfig.device='{dev}'")
    assert tree(tmp_path) == set()


@pytest.mark.parametrize('name,text,msg', [
    ('list.yaml', '- lr: 1.0e-4\n- n_train: 8\n', 'list.yaml must be a YAML mapping of RunConfig fields'),
    ('broken.yaml', 'lr: [1.0e-4\nsteps: 10\n', 'broken.yaml is not valid YAML'),
    ('config.json', 'garbage', 'config.json is not valid JSON (Expecting value at line 1, column 1)'),
])
def test_bad_config_file_names_the_file(tmp_path, name, text, msg):
    (tmp_path/name).write_text(text)
    refused(dmstudy('run', name, cwd=tmp_path), msg)
    assert tree(tmp_path) == {name}


def test_garbage_config_json_in_a_run_directory_names_it(tmp_path):
    (tmp_path/'r').mkdir(); (tmp_path/'r'/'config.json').write_text('{"lr": ')
    refused(dmstudy('run', '--run-dir', 'r', '--set', 'unet=micro', 'steps=2', cwd=tmp_path), 'config.json is not valid JSON')
    assert tree(tmp_path) - {'r/.lock'} == {'r', 'r/config.json'}  # the folder existed: only its lock file may be new
    assert (tmp_path/'r'/'config.json').read_text() == '{"lr": '


def test_single_metric_is_a_one_item_list(tmp_path):
    r = dmstudy('run', '--dry-run', '--set', 'metrics=mem_frac', cwd=tmp_path)
    assert r.returncode == 0 and 'Unknown metric' not in r.stderr, r.stderr
    assert tree(tmp_path) == set()


def test_sweep_grid_value_of_the_wrong_type(tmp_path):
    (tmp_path/'fast.yaml').write_text('base: {unet: micro, steps: 10}\ngrid: {lr: [fast]}\n')
    refused(dmstudy('sweep', 'fast.yaml', '--dry-run', cwd=tmp_path), 'RunConfig.lr', "must be a finite number, got 'fast'")
    assert tree(tmp_path) == {'fast.yaml'}


def test_dry_run_prints_the_cost_and_creates_nothing(tmp_path):
    r = dmstudy('run', '--dry-run', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'run directory: ' in r.stdout and 'one evaluation: 128 samples × 25 sampling steps' in r.stdout and 'GFLOP' in r.stdout, r.stdout
    assert tree(tmp_path) == set()


# --- data files: nothing in them runs ---------------------------------------------------------------------------------

def cifar(tmp_path, **kw):
    from dmstudy.data import write_cifar10_like
    write_cifar10_like(tmp_path/'data', **kw)
    return tmp_path/'data'/'cifar-10-batches-py'


CIFAR = ('--set', 'dataset=cifar10', 'download=false', 'image_size=null', 'unet=micro', 'n_train=16')


def test_missing_cifar(tmp_path):
    refused(dmstudy('run', *CIFAR, cwd=tmp_path), 'CIFAR-10 is not in', 'extract cifar-10-python.tar.gz')
    assert tree(tmp_path) == set()


class Payload:
    "Unpickling it would create the folder `path` (any function a `__reduce__` names runs)."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (os.mkdir, (self.path,))


def test_malicious_cifar_batch_is_refused_and_never_runs(tmp_path):
    folder, marker = cifar(tmp_path), tmp_path/'marker'
    with open(folder/'data_batch_1', 'wb') as f:
        pickle.dump({b'batch_label': Payload(str(marker)), b'labels': [0], b'data': np.zeros((1, 3072), np.uint8)}, f)
    before = tree(tmp_path)
    refused(dmstudy('run', *CIFAR, cwd=tmp_path), 'data_batch_1 is not a CIFAR-10 file: it refers to', 'which the official files never hold, so it was not loaded')
    assert not marker.exists() and tree(tmp_path) == before
    # the same file through the library: refused, and the payload never ran
    from dmstudy.data import load_cifar10
    with pytest.raises(ValueError, match='it refers to .*mkdir'): load_cifar10(tmp_path/'data')
    assert not marker.exists()


def test_truncated_cifar_batch(tmp_path):
    folder = cifar(tmp_path)
    b = folder/'data_batch_3'; b.write_bytes(b.read_bytes()[:500])
    before = tree(tmp_path)
    refused(dmstudy('run', *CIFAR, cwd=tmp_path), 'data_batch_3 is not a readable CIFAR-10 file')
    assert tree(tmp_path) == before


def test_cifar_fixture_is_named_as_not_official(tmp_path):
    "Files that are not the official ones load, but the data source says so, with the first differing file's MD5."
    from dmstudy.data import data_source, CIFAR10_FILE_MD5
    from dmstudy.config import RunConfig
    folder = cifar(tmp_path)
    src = data_source(RunConfig(dataset='cifar10', data_root=str(tmp_path/'data'), download=False))
    md5 = hashlib.md5((folder/'data_batch_1').read_bytes()).hexdigest()
    assert src == {'official': False, 'data': f"cifar10 (not the official files: data_batch_1 MD5 {md5} is not {CIFAR10_FILE_MD5['data_batch_1']}; 7 of 7 files differ)"}


def test_official_md5s_are_torchvisions():
    "The per-file MD5s are the ones torchvision's CIFAR10 checks (an independent copy of the official list)."
    from torchvision.datasets import CIFAR10
    from dmstudy.data import CIFAR10_FILE_MD5, CIFAR10_MD5
    assert CIFAR10_FILE_MD5 == dict(CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta['filename'], CIFAR10.meta['md5']]])
    assert CIFAR10_MD5 == CIFAR10.tgz_md5


def test_npz_with_objects_is_refused(tmp_path):
    np.savez(tmp_path/'x.npz', train_images=np.array([Payload(str(tmp_path/'marker'))], dtype=object))
    refused(dmstudy('run', '--set', 'dataset=npz', 'data_path=x.npz', cwd=tmp_path), 'x.npz is not a readable .npz of arrays (it holds pickled objects, which are never loaded)')
    assert not (tmp_path/'marker').exists() and tree(tmp_path) == {'x.npz'}


def test_checkpoint_with_code_or_truncated_is_one_sentence(tmp_path):
    from dmstudy.config import load_torch_file
    p = tmp_path/'latest.pt'
    torch.save({'x': Payload(str(tmp_path/'marker'))}, p)
    with pytest.raises(ValueError, match=r'latest.pt holds objects other than tensors and plain data \(posix.mkdir\), which are never loaded') as e: load_torch_file(p)
    assert 'weights_only' not in str(e.value) and not (tmp_path/'marker').exists()
    torch.save({'w': torch.ones(100)}, p); p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match=r'latest.pt cannot be read \(.*\): it is truncated, corrupt or not a PyTorch file'): load_torch_file(p)


def test_every_reader_of_files_is_safe():
    "No module unpickles or evaluates files: torch.load always with weights_only=True, yaml only safe_load, np.load never with pickles."
    import re
    src = {p.name: p.read_text() for p in (ROOT/'dmstudy').glob('*.py')}
    for name, s in src.items():
        assert not re.search(r'\bpickle\.loads?\(', s), name
        assert 'yaml.load(' not in s and 'yaml.unsafe_load' not in s and 'allow_pickle=True' not in s, name
        for m in re.finditer(r'torch\.load\(([^\n]*)', s): assert 'weights_only=True' in m.group(1), (name, m.group(0))


# --- the run directory ----------------------------------------------------------------------------------------------

def _read_only(d: Path) -> bool:
    "Make `d` read-only (chmod; for root, the immutable attribute); True when writing into it now fails."
    os.chmod(d, 0o555)
    if os.geteuid() == 0 and shutil.which('chattr'): subprocess.run(['chattr', '+i', str(d)], capture_output=True)
    return not os.access(d, os.W_OK)


def test_read_only_run_directory(tmp_path):
    d = tmp_path/'r'; d.mkdir()
    if not _read_only(d): pytest.skip('this machine cannot make a folder read-only for this user (root without chattr)')
    try:
        refused(dmstudy('run', '--run-dir', 'r', '--set', 'unet=micro', cwd=tmp_path), f'Cannot write to {d.name}: it is read-only')
        assert list(d.iterdir()) == []
    finally:
        if os.geteuid() == 0 and shutil.which('chattr'): subprocess.run(['chattr', '-i', str(d)], capture_output=True)
        os.chmod(d, 0o755)


def test_run_names_unofficial_cifar10_files(tmp_path):
    "A run on CIFAR-10-format files that are not the official ones records so in its data.json, and still runs."
    import json
    from dmstudy.config import RunConfig
    from dmstudy.data import write_cifar10_like
    from dmstudy.train import train
    write_cifar10_like(tmp_path/'data', n_per_batch=8, n_test=8)
    cfg = RunConfig(dataset='cifar10', data_root=str(tmp_path/'data'), n_train=16, n_eval=8, image_size=None, unet='micro', steps=2,
                    eval_steps=(2,), metrics=('loss',), loss_eval_n=8, loss_train_n=8, sample_grid=4, n_samples=4, device='cpu')
    r = train(cfg, tmp_path/'run', quiet=True)
    assert r.status == 'done'
    src = json.loads((tmp_path/'run'/'data.json').read_text())
    assert src['official'] is False and 'not the official files' in src['data'], src
