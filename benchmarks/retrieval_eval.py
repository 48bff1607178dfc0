"""Retrieval evaluation time against the number of images: vlnb's batched ITM rerank against one-at-a-time loops.

ALBEF's retrieval evaluation encodes every image and text once, takes each query's ITC top-k and reranks those k
with the ITM logit of the fused pair, in both directions (i2t: one query per image; t2i: one per caption). The
three ways of running the rerank timed here give the same scores (the table shows the largest difference):

- `vlnb`:      `vlnb.tasks.retrieval.itm_rerank`, the candidates of `--query-batch` queries fused together;
- `per-query`: one fusion pass per query over its k candidates (the loop of the official `evaluation()`);
- `per-pair`:  one fusion pass per (query, candidate) pair (skipped above `--pair-max-images`; it is slow).

Data: the embedded synthetic dataset with `SynthConfig(n_images=N)`, its train, val and test retrieval records
joined into one split of N images (5 captions each). Model: the tiny ALBEF, untrained (timing does not depend on
the weights), eval mode, no gradient. Encoding (shared by all three) is timed once and reported apart. Times are
wall-clock seconds of one run; the machine's other load shows in them.

    python benchmarks/retrieval_eval.py --quick                   # a smoke run (seconds)
    python benchmarks/retrieval_eval.py                           # 100, 300, 1000 images, k = 16
    python benchmarks/retrieval_eval.py --sizes 100 300 --k 32 --pair-max-images 100 --threads 1

On a CPU shared with other jobs, `--threads 1` gives steadier (and often lower) times than torch's default.
"""
import argparse, os, time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from vlnb.data.core import RetrievalDataset, build_transform, read_records
from vlnb.data.synth import SynthConfig, generate
from vlnb.methods.albef import build_albef
from vlnb.metrics import format_table
from vlnb.tasks.retrieval import encode_retrieval_set, itm_rerank
from vlnb.text import train_wordpiece


def dataset(n_images: int, image_size: int, seed: int):
    "All retrieval records (train + val + test) of a synthetic set of `n_images` images, as one eval split."
    root = generate(SynthConfig(n_images=n_images, seed=seed))
    recs = [r for s in ('train', 'val', 'test') for r in read_records(root / f'retrieval_{s}.json')]
    return RetrievalDataset(recs, root, build_transform('val', image_size), split='val')


@torch.no_grad()
def rerank_loop(model, sims, q_emb, q_mask, c_emb, c_mask, k: int, query_is_text: bool, per_pair: bool):
    "The same scores as `itm_rerank`, one fusion pass per query (k candidates) or per (query, candidate) pair."
    Nq, Nc = sims.shape
    k = min(k, Nc)
    scores = torch.full((Nq, Nc), -100.0, device=sims.device)
    for q in range(Nq):
        top = sims[q].topk(k).indices
        groups = [top[j:j + 1] for j in range(k)] if per_pair else [top]
        for c in groups:
            n = len(c)
            if query_is_text: t_e, t_m, i_e = q_emb[q:q + 1].expand(n, -1, -1), q_mask[q:q + 1].expand(n, -1), c_emb[c]
            else: t_e, t_m, i_e = c_emb[c], c_mask[c], q_emb[q:q + 1].expand(n, -1, -1)
            scores[q, c] = model.itm_logits(t_e, t_m, i_e)[:, 1].float()
    return scores


def timed(fn, sync):
    t = time.perf_counter(); out = fn(); sync()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[100, 300, 1000], help='numbers of images')
    ap.add_argument('--k', type=int, default=16, help='ITC top-k reranked by ITM (ALBEF: 256 COCO, 128 Flickr)')
    ap.add_argument('--query-batch', type=int, default=16, help="queries fused together by vlnb's rerank")
    ap.add_argument('--pair-max-images', type=int, default=300, help='run the per-pair loop only up to this many images')
    ap.add_argument('--batch-size', type=int, default=64, help='encoding batch size')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--quick', action='store_true', help='smoke run: 20 images, k = 4')
    a = ap.parse_args()
    if a.quick: a.sizes, a.k = [20], 4
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    where = torch.cuda.get_device_name() if dev.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'

    rows = []
    for n in a.sizes:
        ds = dataset(n, 64, a.seed)
        tok = train_wordpiece(ds.text, vocab_size=300)
        torch.manual_seed(0)
        model = build_albef('tiny', tokenizer=tok, distill=False).to(dev).eval()
        enc, t_enc = timed(lambda: encode_retrieval_set(model, ds, tok, a.batch_size, device=dev, progress=False), sync)
        sims = enc['image_feats'] @ enc['text_feats'].t()
        i_e, t_e, t_m = enc['image_embeds'], enc['text_embeds'], enc['text_masks']

        def vlnb():
            return (itm_rerank(model, sims, i_e, None, t_e, t_m, a.k, False, a.query_batch, progress=False),
                    itm_rerank(model, sims.t(), t_e, t_m, i_e, None, a.k, True, a.query_batch, progress=False))

        def loop(per_pair):
            return lambda: (rerank_loop(model, sims, i_e, None, t_e, t_m, a.k, False, per_pair),
                            rerank_loop(model, sims.t(), t_e, t_m, i_e, None, a.k, True, per_pair))

        with torch.no_grad():
            vlnb()                                                       # warm-up (allocator, kernels)
            ref, t_vlnb = timed(vlnb, sync)
            pq, t_pq = timed(loop(False), sync)
            pp, t_pp = timed(loop(True), sync) if n <= a.pair_max_images else (None, None)
        diff = max((x - y).abs().max().item() for other in (pq, pp) if other is not None for x, y in zip(ref, other))
        rows.append(dict(images=len(ds), texts=len(ds.text), k=a.k, encode=t_enc, vlnb=t_vlnb, per_query=t_pq,
                         per_pair=t_pp, x_query=t_pq / t_vlnb, x_pair=None if t_pp is None else t_pp / t_vlnb,
                         fusions=f'{len(ds) + len(ds.text)} / {len(ds) * min(a.k, len(ds.text)) + len(ds.text) * min(a.k, len(ds))}',
                         max_diff=f'{diff:.1e}'))
        print(f'{n} images done', flush=True)

    print(f'\nRetrieval evaluation, tiny ALBEF (untrained), {where}; rerank seconds (both directions), encoding apart')
    print(format_table(rows, {'images': 'images', 'texts': 'texts', 'k': 'k', 'encode': 'encode s', 'vlnb': 'vlnb rerank s',
                              'per_query': 'per-query s', 'per_pair': 'per-pair s', 'x_query': 'per-query / vlnb',
                              'x_pair': 'per-pair / vlnb', 'fusions': 'passes: per-query / per-pair',
                              'max_diff': 'max abs diff'}))


if __name__ == '__main__':
    main()
