"""Training and sampling speed of dmstudy's U-Net presets beside `diffusers.UNet2DModel` at matched parameters,
each speed switch on and off, timed in alternating rounds in one process (only ratios within one run are meaningful
on a shared machine). Writes a JSON table and a markdown table.

    python bench/speed.py --device cpu --presets cpu-16 cpu-32 --batches 16 --md bench/cpu_table.md
"""
import argparse, contextlib, json, math, os, platform, statistics, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
import dmstudy.unet as U
from dmstudy.config import RunConfig
from dmstudy.diffusion import make_objective
from dmstudy.train import diffusers_like
from dmstudy.unet import build_unet, count_params, unet_flops

SHAPES = {'cpu-16': (1, 16, 16), 'micro': (1, 16, 16)}  # every other preset: (3, 32, 32)

# variant name: (network, switches)
CPU_VARIANTS = {
    'eager': ('dmstudy', {}),
    'channels_last': ('dmstudy', dict(cl=True)),
    'GroupNorm+SiLU unfused': ('dmstudy', dict(unfused=True)),
    'attention by explicit softmax': ('dmstudy', dict(explicit_attn=True)),
    'oneDNN off': ('dmstudy', dict(mkldnn=False)),
    'fused Adam': ('dmstudy', dict(fused=True)),
    '2 threads': ('dmstudy', dict(threads=2)),
    'compile': ('dmstudy', dict(compile='default')),
    'diffusers eager': ('diffusers', {}),
    'diffusers channels_last': ('diffusers', dict(cl=True)),
    'diffusers compile': ('diffusers', dict(compile='default')),
}
GPU_VARIANTS = {
    'eager': ('dmstudy', {}),
    'bf16': ('dmstudy', dict(bf16=True)),
    'bf16 + channels_last': ('dmstudy', dict(bf16=True, cl=True)),
    'bf16 + fused Adam': ('dmstudy', dict(bf16=True, fused=True)),
    'bf16 + compile': ('dmstudy', dict(bf16=True, fused=True, compile='default')),
    'bf16 + compile reduce-overhead': ('dmstudy', dict(bf16=True, fused=True, compile='reduce-overhead')),
    'bf16 + channels_last + compile': ('dmstudy', dict(bf16=True, fused=True, cl=True, compile='default')),
    'diffusers eager': ('diffusers', {}),
    'diffusers bf16': ('diffusers', dict(bf16=True)),
    'diffusers bf16 + compile': ('diffusers', dict(bf16=True, fused=True, compile='default')),
}

def _explicit_sdpa(q, k, v, *a, **kw):  # softmax(QKᵀ/√d)V, the reference the fused kernel replaces
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v

@contextlib.contextmanager
def switched(sw, base_threads):
    "Process-wide switches of one variant, undone afterwards."
    old = (U.norm_silu, F.scaled_dot_product_attention, torch.get_num_threads())
    if sw.get('unfused'): U.norm_silu = lambda n, x: F.silu(n(x))
    if sw.get('explicit_attn'): F.scaled_dot_product_attention = _explicit_sdpa
    torch.set_num_threads(sw.get('threads', base_threads))
    try:
        with torch.backends.mkldnn.flags(enabled=sw.get('mkldnn', True)): yield
    finally:
        U.norm_silu, F.scaled_dot_product_attention = old[:2]; torch.set_num_threads(old[2])

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

class Variant:
    "One network with one set of switches: a training step (forward, backward, Adam) and a sampling forward."
    def __init__(self, name, net, sw, preset, batch, dev, base_threads):
        self.name, self.net_kind, self.sw, self.preset, self.batch, self.dev, self.threads = name, net, sw, preset, batch, dev, base_threads
        shape = SHAPES.get(preset, (3, 32, 32)); self.shape = shape
        torch.manual_seed(0)
        cfg = RunConfig(unet=preset, objective='rf')
        m = build_unet(cfg, shape, 10) if net == 'dmstudy' else diffusers_like(preset, shape, 10)
        self.params, self.flops = count_params(m), unet_flops(m, shape, 1)
        m = m.to(dev)
        if sw.get('cl'): m = m.to(memory_format=torch.channels_last)
        self.model = m
        self.fwd = torch.compile(m, mode=None if sw['compile'] == 'default' else sw['compile']) if sw.get('compile') else m
        fused = sw.get('fused', False)
        self.opt = torch.optim.Adam(m.parameters(), lr=1e-4, fused=fused) if fused else torch.optim.Adam(m.parameters(), lr=1e-4, foreach=False if dev.type == 'cpu' else None)
        self.obj = make_objective(cfg)
        g = torch.Generator(device=dev).manual_seed(0); self.g = g
        mf = torch.channels_last if sw.get('cl') else torch.contiguous_format
        self.x0 = (torch.rand(batch, *shape, device=dev)*2 - 1).contiguous(memory_format=mf)
        self.y = torch.randint(0, 10, (batch,), device=dev)
        self.c = torch.full((batch,), 500., device=dev)
        self.train_s, self.sample_s, self.compile_s, self.peak_mb = [], [], None, float('nan')

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16) if self.sw.get('bf16') else contextlib.nullcontext()

    def step(self):
        self.model.train()
        with self.autocast(): loss = self.obj.loss(self.fwd, self.x0, self.y, self.g)[0].float().mean()
        self.opt.zero_grad(set_to_none=True); loss.backward(); self.opt.step()

    def sample(self):
        self.model.eval()
        with torch.no_grad(), self.autocast(): return self.fwd(self.x0, self.c, self.y)

    def warm(self, n):
        with switched(self.sw, self.threads):
            t = time.perf_counter(); self.step(); self.sample(); sync(self.dev); first = time.perf_counter() - t
            for _ in range(n): self.step(); self.sample()
            sync(self.dev)
        if self.sw.get('compile'): self.compile_s = first

    def time(self, steps):
        with switched(self.sw, self.threads):
            if self.dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(self.dev)
            sync(self.dev); t = time.perf_counter()
            for _ in range(steps): self.step()
            sync(self.dev); self.train_s.append((time.perf_counter() - t)/steps)
            t = time.perf_counter()
            for _ in range(steps): self.sample()
            sync(self.dev); self.sample_s.append((time.perf_counter() - t)/steps)
            if self.dev.type == 'cuda': self.peak_mb = torch.cuda.max_memory_allocated(self.dev)/2**20

def matmul_peak(dev, dtype, n=8192, reps=20):
    "Measured TFLOP/s of an n×n×n matrix product: the peak the model's throughput is compared with."
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3): a @ b
    sync(dev); t = time.perf_counter()
    for _ in range(reps): a @ b
    sync(dev); return 2*n**3*reps/(time.perf_counter() - t)/1e12

def run(presets, batches, variants, dev, rounds, steps, warmup, threads, skip, log=print):
    rows, loads = [], []
    for preset in presets:
        for batch in batches:
            torch._dynamo.reset()  # graphs of another preset would make dynamo retrace with dynamic shapes (inductor then fails on cpu-32)
            vs = [Variant(k, net, sw, preset, batch, dev, threads) for k, (net, sw) in variants.items() if not skip(preset, batch, k)]
            for v in vs:
                log(f'{preset} B={batch}: warming up {v.name}'); v.warm(warmup)
            for r in range(rounds):  # alternating rounds: A, B, C, ..., A, B, C, ...
                loads.append(os.getloadavg()[0])
                for v in vs: v.time(steps)
                log(f'{preset} B={batch} round {r+1}/{rounds} done (load {os.getloadavg()[0]:.1f})')
            base = next((v for v in vs if v.name == 'diffusers eager'), None)
            for v in vs:
                tr, sa = statistics.median(v.train_s), statistics.median(v.sample_s)
                row = dict(preset=preset, batch=batch, variant=v.name, params=v.params, train_img_s=batch/tr, sample_img_s=batch/sa,
                           train_tflop_s=3*v.flops*batch/tr/1e12, best_train_img_s=batch/min(v.train_s), compile_s=v.compile_s,
                           peak_mem_mb=v.peak_mb, train_s_rounds=v.train_s, sample_s_rounds=v.sample_s)
                if base is not None:  # ratios per round (same round, neighbouring in time), then their median
                    row['train_vs_diffusers'] = statistics.median(b/a for a, b in zip(v.train_s, base.train_s))
                    row['sample_vs_diffusers'] = statistics.median(b/a for a, b in zip(v.sample_s, base.sample_s))
                peer = next((w for w in vs if w.net_kind == 'diffusers' and w.sw == v.sw), None)  # diffusers with the same switches
                if peer is not None and peer is not base and v.net_kind == 'dmstudy':
                    row['train_vs_diffusers_same'] = statistics.median(b/a for a, b in zip(v.train_s, peer.train_s))
                    row['sample_vs_diffusers_same'] = statistics.median(b/a for a, b in zip(v.sample_s, peer.sample_s))
                rows.append(row)
            del vs
    return rows, loads

def markdown(rows, meta):
    cols = ['preset', 'batch', 'variant', 'params', 'train_img_s', 'sample_img_s', 'train_vs_diffusers', 'sample_vs_diffusers',
            'train_vs_diffusers_same', 'sample_vs_diffusers_same', 'train_tflop_s', 'compile_s'] + (['peak_mem_mb', 'frac_bf16_peak'] if any('frac_bf16_peak' in r for r in rows) else [])
    fmt = lambda v: '' if v is None or (isinstance(v, float) and math.isnan(v)) else (f'{v:,.3g}' if isinstance(v, float) else f'{v:,}' if isinstance(v, int) else str(v))
    out = [' | '.join(cols), ' | '.join('---' for _ in cols)]
    out += [' | '.join(fmt(r.get(c)) for c in cols) for r in rows]
    head = '\n'.join(f'- {k}: {v}' for k, v in meta.items())
    return head + '\n\n' + '\n'.join('| ' + l + ' |' for l in out) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--presets', nargs='+', default=['cpu-16', 'cpu-32'])
    p.add_argument('--batches', nargs='+', type=int, default=[16])
    p.add_argument('--variants', nargs='+', help='variant names (default: all for the device)')
    p.add_argument('--costly-presets', nargs='*', help='presets that get the costly variants, compiled or 2 threads (default: all)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=5, help='timed steps per variant per round')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=1, help='intra-op threads (CPU)')
    p.add_argument('--peak', action='store_true', help='measure the bf16 matmul peak and report the fraction of it')
    p.add_argument('--json'); p.add_argument('--md')
    a = p.parse_args(argv)
    if min(a.rounds, a.steps, a.threads, *a.batches) < 1 or a.warmup < 0: p.error('--rounds, --steps, --threads and --batches must be at least 1, --warmup at least 0.')
    if bad := [k for k in a.presets if k not in U.UNET_PRESETS]: p.error(f'unknown preset(s) {bad}; choose from {list(U.UNET_PRESETS)}.')
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): sys.exit('No CUDA device is visible; run with --device cpu or on a machine with a GPU.')
    allv = GPU_VARIANTS if dev.type == 'cuda' else CPU_VARIANTS
    if a.variants:
        bad = [v for v in a.variants if v not in allv]
        if bad: sys.exit(f'Unknown variant(s) {bad}; choose from {list(allv)}.')
    variants = {k: allv[k] for k in (a.variants or allv)}
    cp = a.presets if a.costly_presets is None else a.costly_presets
    skip = lambda preset, batch, k: ('compile' in k or 'threads' in k) and preset not in cp
    if 'diffusers' in ' '.join(variants):
        try: import diffusers  # noqa
        except ImportError: sys.exit("diffusers is not installed; pip install 'dmstudy[bench]' (diffusers>=0.30) to compare.")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    rows, loads = run(a.presets, a.batches, variants, dev, a.rounds, a.steps, a.warmup, a.threads, skip,
                      log=lambda s: print(time.strftime('%H:%M:%S'), s, flush=True))
    meta = {'date (UTC)': time.strftime('%Y-%m-%d %H:%M', time.gmtime()), 'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or platform.machine(),
            'torch': torch.__version__, 'threads': a.threads, 'cores': os.cpu_count(), 'rounds': a.rounds, 'steps per round': a.steps,
            'load average (1 min) at each round': f"{min(loads):.1f}–{max(loads):.1f}", 'wall time (s)': round(time.time() - t0),
            'inductor cache': os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default (/tmp/torchinductor_$USER)')}
    if a.peak:
        pk = matmul_peak(dev, torch.bfloat16 if dev.type == 'cuda' else torch.float32)
        meta['measured matmul peak (TFLOP/s)'] = f'{pk:.3g} ({"bf16" if dev.type == "cuda" else "fp32"})'
        for r in rows: r['frac_bf16_peak'] = r['train_tflop_s']/pk
    md = markdown(rows, meta)
    print(md)
    if a.json: Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + '\n')
    if a.md: Path(a.md).write_text(md)

if __name__ == '__main__': main()
