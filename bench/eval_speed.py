"""One evaluation of the demo's size (128 samples × 25 Euler steps, losses on 256 train + 256 test draws at 7 noise
levels, memorization, nearest neighbours, pixel SW), with each switch that may speed it up, timed in alternating
rounds in one process; it prints each variant's measured train loss, which shows the switches that change values.

    python bench/eval_speed.py --threads 1 --rounds 3
"""
import argparse, copy, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from profile_demo import DEMO
from dmstudy.config import RunConfig
from dmstudy.data import load_split
from dmstudy.diffusion import make_objective, prepare_model
from dmstudy.metrics import evaluate
from dmstudy.unet import build_unet

VARIANTS = {'default': {}, 'channels_last': dict(channels_last=True), 'eval_batch_size 64': dict(eval_batch_size=64),
            'eval_batch_size 512': dict(eval_batch_size=512), 'channels_last + eval_batch_size 512': dict(channels_last=True, eval_batch_size=512)}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args(argv)
    if min(a.threads, a.rounds) < 1: p.error('--threads and --rounds must be at least 1.')
    torch.set_num_threads(a.threads)
    base = RunConfig(**DEMO); split = load_split(base)
    torch.manual_seed(0)
    m0 = build_unet(base, split.image_shape, split.num_classes).eval()
    noise = torch.randn(base.n_samples, *split.image_shape, generator=torch.Generator().manual_seed(0))
    times, out, loads = {k: [] for k in VARIANTS}, {}, []
    for r in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for k, sw in VARIANTS.items():
            cfg = base.with_updates(**sw); m = prepare_model(copy.deepcopy(m0), cfg, 'cpu')
            t = time.perf_counter(); out[k] = evaluate(m, make_objective(cfg), split, cfg, noise, gen=torch.Generator().manual_seed(1))
            times[k].append(time.perf_counter() - t)
    ref = min(times['default'])
    print(f"- threads: {a.threads}\n- rounds: {a.rounds}\n- load average (1 min) at each round: {min(loads):.1f}–{max(loads):.1f}\n")
    print('| variant | best s | vs default | loss/train |\n| --- | --- | --- | --- |')
    for k, v in times.items():
        print(f"| {k} | {min(v):.2f} | {ref/min(v):.2f} | {out[k]['loss/train']:.6f} |")

if __name__ == '__main__': main()
