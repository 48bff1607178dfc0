"""Pre-training throughput of ALBEF: samples/s, ms/step, peak memory and (on a GPU) model FLOPs utilisation.

One optimizer step = the full ALBEF pre-training forward (ITC with momentum features and queue, ITM on 3B pairs,
MLM with the momentum teacher), backward, AdamW step. Inputs are random tensors of the preset's shapes (images at the
preset's resolution, token ids of length 25 as ALBEF pre-trains), so the numbers measure the model, not the data
loader. Each configuration runs in a fresh subprocess so that its peak memory (max RSS on the CPU,
`torch.cuda.max_memory_allocated` on a GPU) is its own. FLOPs per step are counted once with
`torch.utils.flop_counter.FlopCounterMode` (matmuls/convolutions/attention; forward + backward).

    python benchmarks/pretrain.py                         # tiny (batch 32) and base (batch 4) on the CPU
    python benchmarks/pretrain.py --device cuda --dtype bf16 --configs tiny:64 base:64
"""
import argparse, json, os, resource, statistics, subprocess, sys, time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# dense bf16 peak of the accelerators we may be lent (for MFU); unknown devices print no MFU
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def one(preset: str, batch: int, steps: int, warmup: int, device: str, dtype: str, threads: int) -> dict:
    import torch
    from vlnb.methods.albef import build_albef, albef_config
    if threads: torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = albef_config(preset, queue_size=max(batch * 8, 1024) // batch * batch)
    model = build_albef(cfg).to(device).train()
    V = model.text_encoder.config.vocab_size
    S = model.visual_encoder.img_size[0]
    g = torch.Generator().manual_seed(0)
    b = dict(image=torch.randn(batch, 3, S, S, generator=g), input_ids=torch.randint(5, V, (batch, 25), generator=g),
             attention_mask=torch.ones(batch, 25, dtype=torch.long))
    b['input_ids'][:, 0] = 2
    b['idx'] = torch.arange(batch)
    b = {k: v.to(device) for k, v in b.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.startswith('cuda'))
    cuda = device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if cuda and dtype == 'bf16' else torch.autocast('cpu', enabled=False)

    def step():
        with amp: out = model(b)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False)
    with fc: step()
    flops = fc.get_total_flops()
    for _ in range(warmup): step()
    sync()
    if cuda: torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dev = torch.cuda.get_device_name() if cuda else f'CPU ({torch.get_num_threads()} threads)'
    mfu = None
    if cuda and dtype == 'bf16':
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in dev), None)
        if peak_flops: mfu = flops / (ms / 1e3) / peak_flops
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(preset=preset, batch=batch, device=dev, dtype=dtype if cuda else 'fp32', params_m=n_params / 1e6,
                ms_step=ms, ms_min=min(times) * 1e3, samples_s=batch / (ms / 1e3), peak_gib=peak,
                gflop_step=flops / 1e9, tflops_s=flops / (ms / 1e3) / 1e12, mfu=mfu, steps=steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--configs', nargs='+', default=['tiny:32', 'base:4'], help='preset:batch pairs')
    ap.add_argument('--steps', type=int, default=None, help='timed steps (default: 20 tiny / 3 base on the CPU, 20 on a GPU)')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'], help='autocast dtype on a GPU (the CPU runs fp32)')
    ap.add_argument('--threads', type=int, default=0, help='torch threads on the CPU (0: torch default)')
    ap.add_argument('--one', default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        preset, batch = a.one.split(':')
        steps = a.steps or (20 if preset == 'tiny' or a.device != 'cpu' else 3)
        print(json.dumps(one(preset, int(batch), steps, a.warmup, a.device, a.dtype, a.threads)))
        return
    rows = []
    for c in a.configs:
        cmd = [sys.executable, __file__, '--one', c, '--device', a.device, '--dtype', a.dtype, '--warmup', str(a.warmup),
               '--threads', str(a.threads)] + (['--steps', str(a.steps)] if a.steps else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0: sys.exit(f'{c} failed:\n{r.stderr[-3000:]}')
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    import torch
    print(f'torch {torch.__version__}; {rows[0]["device"]}; ALBEF pre-training step (ITC+MoD+queue, ITM 3B pairs, MLM + teacher), '
          f'text length 25, AdamW\n')
    mem = 'peak GPU GiB' if a.device.startswith('cuda') else 'peak RSS GiB'
    print(f'| preset | params (M) | batch | dtype | ms/step (median / min) | samples/s | {mem} | GFLOP/step | TFLOP/s | MFU |')
    print('|---|---:|---:|---|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '—'
        print(f'| {r["preset"]} | {r["params_m"]:.1f} | {r["batch"]} | {r["dtype"]} | {r["ms_step"]:.0f} / {r["ms_min"]:.0f} | '
              f'{r["samples_s"]:.1f} | {r["peak_gib"]:.2f} | {r["gflop_step"]:.1f} | {r["tflops_s"]:.3f} | {mfu} |')


if __name__ == '__main__':
    main()
