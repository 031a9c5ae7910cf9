"""The GPU check, in one process under a time budget: the paper presets at B = 16 and 128 with each speed switch beside
`diffusers.UNet2DModel`, achieved TFLOP/s against a measured bf16 matmul peak, peak memory, `dmstudy bench` itself,
and the wall time of one paper-protocol evaluation (5,120 samples × 250 Euler steps, plus the memorization search).
Writes the GPU section of bench/RESULTS.md. Run it through bench/gpu.sh.
"""
import argparse, json, os, re, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
import speed
from dmstudy.config import RunConfig
from dmstudy.diffusion import make_objective
from dmstudy.metrics import generate, memorization_fraction
from dmstudy.unet import build_unet

ROOT = Path(__file__).resolve().parent.parent
EAGER = [k for k in speed.GPU_VARIANTS if 'compile' not in k]
COMPILED = [k for k in speed.GPU_VARIANTS if 'compile' in k]

def paper_eval(preset, dev, n, steps, batch, fraction, log):
    "Seconds for `n` samples × `steps` Euler steps of `preset` (bf16 when CUDA) and their memorization search against 50,000 images."
    torch.manual_seed(0)
    cfg = RunConfig(unet=preset, objective='rf', sample_steps=steps)
    m = build_unet(cfg, (3, 32, 32), 10).to(dev).eval()
    obj = make_objective(cfg)
    k = max(1, round(n*fraction)); k = min(n, max(batch, k - k % batch))  # whole batches
    noise = torch.randn(k, 3, 32, 32, device=dev); y = torch.arange(k, device=dev) % 10
    ac = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else torch.autocast('cpu', enabled=False)
    with torch.no_grad(), ac: generate(m, obj, noise[:batch], y[:batch], batch_size=batch, steps=1)  # warm-up
    speed.sync(dev); t = time.perf_counter()
    with torch.no_grad(), ac: x = generate(m, obj, noise, y, batch_size=batch, steps=steps).float()
    speed.sync(dev); ts = (time.perf_counter() - t) * n/k
    train = torch.randint(0, 256, (50_000 if dev.type == 'cuda' else 2_000, 3, 32, 32), dtype=torch.uint8, device=dev)
    xs = x.repeat((n + len(x) - 1)//len(x), 1, 1, 1)[:n].clamp(-1, 1)
    speed.sync(dev); t = time.perf_counter(); memorization_fraction(xs, train); speed.sync(dev); tn = time.perf_counter() - t
    log(f'paper evaluation of {preset}: sampling {ts:.1f} s ({k} of {n} samples timed), nearest neighbours {tn:.1f} s')
    return dict(preset=preset, samples=n, euler_steps=steps, batch=batch, timed_samples=k, sampling_s=ts,
                nn_reference=len(train), nn_s=tn, total_s=ts + tn, extrapolated=k < n)

def sync_check(dev, steps, log):
    "Synchronizing CUDA calls in `steps` training steps between evaluations of a real run (`torch.cuda.set_sync_debug_mode`); goal: none."
    import tempfile, warnings
    from unittest import mock
    from dmstudy.train import IndexSampler, train
    cuda = dev.type == 'cuda'  # elsewhere the same run, without the debug mode (on the CPU the notebook 05_train counts host reads instead)
    cfg = RunConfig(unet='cpu-16', n_train=64, steps=steps, eval_steps=(steps,), metrics=('loss',), sample_steps=10, batch_size=16, device=dev.type)
    marks, first = [], IndexSampler.next
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as d:
        warnings.simplefilter('always')
        def next_batch(self, b):  # how many synchronizing calls had been warned about when each batch was drawn
            marks.append(sum('synchroniz' in str(w.message) for w in caught)); return first(self, b)
        if cuda: torch.cuda.set_sync_debug_mode('warn')
        try:
            with mock.patch.object(IndexSampler, 'next', next_batch): train(cfg, d, quiet=True)
        finally:
            if cuda: torch.cuda.set_sync_debug_mode(0)
    syncs = marks[-1] - marks[0]  # from the first batch to the last: every step but the last, no evaluation
    seen = sorted({str(w.message).splitlines()[0][:160] for w in caught if 'synchroniz' in str(w.message)})
    log(f'synchronizing calls in {len(marks) - 1} training steps between evaluations: {syncs if cuda else "not measured (CUDA only)"}')
    return dict(steps=len(marks) - 1, syncs=syncs if cuda else None, messages=seen[:5])

def cli_bench(preset, batch, dev, steps, rounds, log):
    "`dmstudy bench` itself (through `python -m dmstudy.cli`), bf16 + channels_last + compile: its table as rows."
    out = ROOT/'bench'/f'.cli_{preset}_{batch}.json'
    cmd = [sys.executable, '-m', 'dmstudy.cli', 'bench', '--preset', preset, '--batch-size', str(batch), '--device', dev.type,
           '--steps', str(steps), '--rounds', str(rounds), '--bf16', '--channels-last', '--compile', '--out', str(out)]
    log(' '.join(cmd[1:]))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: return [dict(preset=preset, error=(r.stderr.strip().splitlines() or ['?'])[-1])]
    rows = json.loads(out.read_text()); out.unlink()
    return rows

def write_results(md):
    "Replace the GPU section of bench/RESULTS.md (between its markers), keeping the rest."
    p = ROOT/'bench'/'RESULTS.md'
    text = p.read_text() if p.exists() else '# Speed measurements\n'
    block = f'<!-- gpu:start -->\n{md}<!-- gpu:end -->\n'
    text = re.sub(r'<!-- gpu:start -->.*?<!-- gpu:end -->\n', lambda _: block, text, flags=re.S) if '<!-- gpu:start -->' in text else text.rstrip('\n') + '\n\n' + block
    p.write_text(text)
    return p

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--quick', action='store_true', help='the same code path, tiny: micro preset, B=4, one round, a 16-sample evaluation')
    p.add_argument('--budget', type=float, default=420., help='seconds; stages that would start later are skipped and listed')
    p.add_argument('--no-compile', action='store_true')
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('No CUDA device is visible: run bench/gpu.sh on a machine with a GPU, or set DMSTUDY_BENCH_DEVICE=cpu to try it here.')
    if dev.type == 'cpu': torch.set_num_threads(1)  # a dry run on a shared CPU: one thread is the fastest
    t0 = time.time(); left = lambda: a.budget - (time.time() - t0)
    log = lambda s: print(f'[{time.time() - t0:5.0f} s] {s}', flush=True)
    if a.quick: presets, batches, rounds, steps, ev = ['micro'], [4], 1, 1, dict(preset='paper-3m', n=16, steps=2, batch=8, fraction=1.)
    else: presets, batches, rounds, steps, ev = ['paper-3m', 'paper-26m', 'paper-93m'], [16, 128], 3, 10, dict(preset='paper-93m', n=5120, steps=250, batch=512, fraction=0.1)
    peak = speed.matmul_peak(dev, torch.bfloat16, n=8192 if dev.type == 'cuda' else 512, reps=20 if dev.type == 'cuda' else 2)
    log(f'bf16 matmul peak: {peak:.3g} TFLOP/s')
    rows, skipped, done = [], [], []
    state = dict(cli=[], evaluation=None, sync=None)
    def report():  # written after every stage: a run stopped by the time limit keeps what it measured
        md = summary(rows, state, presets, batches, peak, dev, rounds, steps, t0, skipped, done)
        (ROOT/'bench'/'gpu_results.json').write_text(json.dumps(dict(rows=rows, **state), indent=1, default=str) + '\n')
        write_results(md); return md
    stages = [('sync',)] + [('eager', p_, b, EAGER) for p_ in presets for b in batches] + [('evaluation',), ('cli',)]
    if not a.no_compile:  # the goals first: the small model at B=16 (launch-bound), the big one at B=128 (compute-bound)
        order = sorted([(p_, b) for p_ in presets for b in batches], key=lambda pb: (pb not in (('paper-3m', 16), ('paper-93m', 128)), pb))
        stages += [('compiled', p_, b, COMPILED + ['diffusers eager']) for p_, b in order]
    for st in stages:
        name = ' '.join(map(str, st[:3]))
        if left() < (30 if st[0] in ('evaluation', 'cli', 'sync') else 90): skipped.append(name); continue
        if st[0] == 'sync': state['sync'] = sync_check(dev, 30 if a.quick else 300, log)
        elif st[0] == 'evaluation': state['evaluation'] = paper_eval(ev['preset'], dev, ev['n'], ev['steps'], ev['batch'], ev['fraction'], log)
        elif st[0] == 'cli': state['cli'] = cli_bench(presets[0], batches[0], dev, steps, 1, log)
        else:
            kind, preset, batch, names = st
            r, _ = speed.run([preset], [batch], {k: speed.GPU_VARIANTS[k] for k in names}, dev, rounds, steps, 2, torch.get_num_threads(),
                             lambda *_: False, log=log)
            for x in r:
                x['frac_bf16_peak'] = x['train_tflop_s']/peak
                if kind == 'compiled' and x['variant'] == 'diffusers eager': continue  # timed again only as the ratios' peer
                rows.append(x)
        done.append(name); report()
    md = report(); print(md)
    log(f"wrote {ROOT/'bench'/'RESULTS.md'}")

def summary(rows, state, presets, batches, peak, dev, rounds, steps, t0, skipped, done):
    "The GPU section of RESULTS.md: the table, the goals, `dmstudy bench`'s rows and the evaluation's wall time."
    notes = []
    best16 = max((x for x in rows if x['preset'] == presets[0] and x['batch'] == batches[0] and 'diffusers' not in x['variant']),
                 key=lambda x: x['train_img_s'], default=None)
    big = max((x for x in rows if x['preset'] == presets[-1] and x['batch'] == batches[-1] and 'diffusers' not in x['variant']),
              key=lambda x: x['frac_bf16_peak'], default=None)
    if big: notes.append(f"{presets[-1]} at B={batches[-1]}: best {big['frac_bf16_peak']:.0%} of the measured bf16 peak ({big['variant']}); goal ≥ 40%.")
    if best16 and 'train_vs_diffusers' in best16:
        notes.append(f"{presets[0]} at B={batches[0]}: best {best16['train_vs_diffusers']:.2f}× diffusers eager in training ({best16['variant']}); goal ≥ 2×.")
    meta = {'date (UTC)': time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
            'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{dev} (a dry run of the code path, not a GPU measurement)',
            'torch': torch.__version__, 'measured bf16 matmul peak (TFLOP/s)': f'{peak:.4g}', 'rounds × steps': f'{rounds} × {steps}',
            'wall time so far (s)': round(time.time() - t0), 'stages done': ', '.join(done) or 'none',
            'skipped for the time budget': ', '.join(skipped) or 'nothing'}
    md = '## GPU\n\nProduced by `bash bench/gpu.sh`.\n\n' + speed.markdown(rows, meta)
    if notes: md += '\nGoals:\n\n' + '\n'.join(f'- {n}' for n in notes) + '\n'
    if state['cli']:
        md += '\n`dmstudy bench` (bf16, channels_last, compile):\n\n' + '\n'.join(
            f"- {c.get('model', c.get('preset'))}: " + (c['error'] if 'error' in c else f"{c['train_img_s']:,.0f} train img/s, {c['sample_img_s']:,.0f} sample img/s, peak {c['peak_mem_mb']:,.0f} MiB") for c in state['cli']) + '\n'
    if state.get('sync') and state['sync']['syncs'] is not None:
        sc = state['sync']
        md += (f"\nSynchronizing CUDA calls in {sc['steps']} training steps of a real run between evaluations "
               f"(`torch.cuda.set_sync_debug_mode('warn')`): {sc['syncs']} (goal 0)" + (f"; first: {sc['messages']}" if sc['syncs'] else '') + '.\n')
    if state['evaluation']:
        e = state['evaluation']; ap = '≈ ' if e['extrapolated'] else ''
        md += (f"\nPaper-protocol evaluation of `{e['preset']}`: {e['samples']:,} samples × {e['euler_steps']} Euler steps (bf16, batches of {e['batch']}) "
               f"{ap}{e['sampling_s']:.1f} s" + (f" (extrapolated from {e['timed_samples']:,} samples timed)" if e['extrapolated'] else '') +
               f", and their memorization search against {e['nn_reference']:,} images {e['nn_s']:.1f} s: {ap}{e['total_s']:.1f} s in all.\n")
    return md

if __name__ == '__main__': main()
