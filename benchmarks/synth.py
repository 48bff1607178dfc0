"""Throughput of the synthetic dataset generator (vlnb.data.synth) on ONE CPU core.

    python benchmarks/synth.py [--n 400] [--sizes 64 224]

Pins itself to one core (os.sched_setaffinity; or run under `taskset -c 0`) and limits BLAS/torch threads. Prints, per
image size: images/s for rendering alone (scene + pixels + PNG encoding, in memory) and for the whole `generate()`
(also writing the PNGs and every task's records to disk), and the size of the dataset on disk.
"""
import argparse, os, shutil, tempfile, time

for v in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'): os.environ.setdefault(v, '1')
if hasattr(os, 'sched_setaffinity'):
    try: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except OSError: pass

from pathlib import Path
from vlnb.data.synth import SynthConfig, generate, sample_scene, render_scene, png_bytes, image_rng


def bench(size: int, n: int) -> dict:
    cfg = SynthConfig(n_images=n, image_size=size, seed=123)
    t = time.perf_counter(); nbytes = 0
    for i in range(n):
        rng = image_rng(cfg.seed, i); nbytes += len(png_bytes(render_scene(sample_scene(cfg, rng), cfg, rng)))
    render = n / (time.perf_counter() - t)
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter(); root = generate(cfg, tmp / 'ds'); full = n / (time.perf_counter() - t)
        disk = sum(p.stat().st_size for p in root.rglob('*') if p.is_file())
    finally: shutil.rmtree(tmp, ignore_errors=True)
    return dict(size=size, n=n, render=render, full=full, png_kb=nbytes / n / 1024, disk_mb=disk / 2**20)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=400)
    ap.add_argument('--sizes', type=int, nargs='+', default=[64, 224])
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'
    print(f'synthetic data generation, {cores} core(s), {a.n} images per size')
    print(f"{'size':>6}{'render img/s':>14}{'generate img/s':>16}{'PNG KB/img':>12}{'dataset MB':>12}")
    for s in a.sizes:
        r = bench(s, a.n)
        print(f"{r['size']:>6}{r['render']:>14.0f}{r['full']:>16.0f}{r['png_kb']:>12.1f}{r['disk_mb']:>12.1f}")
