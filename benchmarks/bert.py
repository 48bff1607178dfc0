"""Forward + backward time per step of vlnb's BERT against `transformers.BertModel` (SDPA), same config and weights.

Both run a text-encoder step (no cross-attention: HF's BertModel only cross-attends as a causal decoder) on a
padded batch (batch 32, length 32 by default; a quarter of the rows padded to half length), loss = mean of the
squared last hidden state, `backward()`, then the gradients are cleared. Warm-up steps first, then the two models
alternate step by step so that machine noise hits both alike; the table gives the median (and min) ms/step.

    python benchmarks/bert.py                       # tiny and base on the CPU
    python benchmarks/bert.py --device cuda --steps 50
"""
import argparse, os, statistics, time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import transformers
from vlnb.models.bert import BertModel, bert_config


def make_pair(preset, device, dtype=torch.float32):
    cfg = bert_config(preset)
    cfg = bert_config(preset, fusion_layer=cfg.num_hidden_layers)  # a plain BERT: no cross-attention layers
    hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ('fusion_layer', 'encoder_width')})
    hf_cfg._attn_implementation = 'sdpa'
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False)
    ours = BertModel(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return cfg, hf.to(device, dtype).train(), ours.to(device, dtype).train()


def batch(cfg, B, L, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[: B // 4, L // 2:] = 0
    return ids.to(device), am.to(device)


def step(model, ids, am, ours, sync):
    t = time.perf_counter()
    kw = dict(mode='text') if ours else {}
    out = model(input_ids=ids, attention_mask=am, **kw).last_hidden_state
    out.float().square().mean().backward()
    for p in model.parameters(): p.grad = None
    sync()
    return (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--configs', nargs='+', default=['tiny', 'base'])
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--length', type=int, default=32)
    ap.add_argument('--steps', type=int, default=None, help='timed steps per model (default: 30 tiny / 8 base on CPU)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith('cuda') else (lambda: None)
    dev_name = torch.cuda.get_device_name() if a.device.startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, transformers {transformers.__version__}, {dev_name}, {a.dtype}, '
          f'batch {a.batch} x length {a.length}, forward+backward, dropout on (train mode)\n')
    rows = []
    for preset in a.configs:
        torch.manual_seed(0)
        cfg, hf, ours = make_pair(preset, a.device, dtype)
        ids, am = batch(cfg, a.batch, a.length, a.device)
        n = a.steps or (30 if preset == 'tiny' or a.device != 'cpu' else 8)
        for _ in range(a.warmup):
            step(hf, ids, am, False, sync); step(ours, ids, am, True, sync)
        th, to = [], []
        for _ in range(n):
            th.append(step(hf, ids, am, False, sync)); to.append(step(ours, ids, am, True, sync))
        rows.append((preset, cfg, statistics.median(th), min(th), statistics.median(to), min(to), n))
    print('| config | layers x width | transformers ms/step (median / min) | vlnb ms/step (median / min) | vlnb / transformers | steps |')
    print('|---|---|---|---|---|---|')
    for preset, cfg, mh, nh, mo, no, n in rows:
        print(f'| {preset} | {cfg.num_hidden_layers} x {cfg.hidden_size} | {mh:.1f} / {nh:.1f} | {mo:.1f} / {no:.1f} | {mo / mh:.3f} | {n} |')


if __name__ == '__main__':
    main()
