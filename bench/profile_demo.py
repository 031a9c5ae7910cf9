"""Where the time goes: `torch.profiler` tables of training steps and of one evaluation of the demo's configuration
(digits at 16×16, the unconditional `cpu-16` U-Net, batch 16, 128 samples × 25 Euler steps, losses at 7 levels).

    python bench/profile_demo.py [--steps 10] [--out bench/profile.txt]
"""
import argparse, copy, os, time
from pathlib import Path
import torch
from torch.profiler import profile, ProfilerActivity
from dmstudy.config import RunConfig
from dmstudy.data import load_split, to_model_space
from dmstudy.diffusion import make_objective
from dmstudy.metrics import evaluate
from dmstudy.train import make_optimizer
from dmstudy.unet import build_unet

DEMO = dict(dataset='digits', image_size=16, unet='cpu-16', class_cond=False, objective='rf', sample_steps=25, batch_size=16,
            lr=1e-3, metrics=('loss', 'loss_t', 'mem_frac', 'nn_dist', 'sw_pixel'), n_eval=500, n_samples=128, n_sw=128,
            loss_eval_n=256, loss_train_n=256, device='cpu', n_train=64)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=10, help='training steps profiled')
    p.add_argument('--rows', type=int, default=15, help='rows per table')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = RunConfig(**DEMO)
    split = load_split(cfg)
    torch.manual_seed(0)
    model = build_unet(cfg, split.image_shape, split.num_classes)
    obj, opt = make_objective(cfg), make_optimizer(cfg, model.parameters(), torch.device('cpu'))
    g = torch.Generator().manual_seed(0)
    def step():
        idx = torch.randint(0, split.n_train, (cfg.batch_size,), generator=g)
        loss = obj.loss(model, to_model_space(split.train_images[idx]), None, g)[0].float().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(3): step()
    out = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(a.steps): step()
        dt = time.perf_counter() - t
    out.append(f"## {a.steps} training steps of the demo (cpu-16, B={cfg.batch_size}, {a.threads} thread): {dt/a.steps*1e3:.0f} ms/step "
               f"under the profiler, load average {os.getloadavg()[0]:.1f}\n")
    out.append(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=a.rows))
    ema = copy.deepcopy(model).eval()
    noise = torch.randn(cfg.n_samples, *split.image_shape, generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter(); evaluate(ema, obj, split, cfg, noise, gen=torch.Generator().manual_seed(1)); dt = time.perf_counter() - t
    out.append(f"\n## One evaluation of the demo ({cfg.n_samples} samples × {cfg.sample_steps} Euler steps, losses on "
               f"{cfg.loss_train_n} train + {cfg.loss_eval_n} test draws, {', '.join(cfg.metrics)}): {dt:.1f} s under the profiler, "
               f"load average {os.getloadavg()[0]:.1f}\n")
    out.append(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=a.rows))
    text = '\n'.join(out)
    print(text)
    if a.out: Path(a.out).write_text(text + '\n')

if __name__ == '__main__': main()
