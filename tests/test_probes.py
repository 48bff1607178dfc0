"""The probes in benchmarks/. vit_shape_probe.py reads the right patches: with a 'ViT' whose tokens are the patches' mean pixel colour,
the frozen colour probe must name the objects' colours, and must not when the labels are shuffled. itm_probe.py's AUC is checked by hand,
and oracle_vqa.py's scene-graph tokens against each record's own scene."""
import sys
import torch, torch.nn as nn, torch.nn.functional as F
from conftest import ROOT
sys.path.insert(0, str(ROOT / 'benchmarks'))
from vit_shape_probe import load_objects, object_features, linear_probe, reinit
from itm_probe import roc_auc, shifted
from vlnb.data.synth import SynthConfig, generate, COLOURS


class PatchColour(nn.Module):
    "Tokens (B, 1 + N, 3): a zero [CLS], then each 8x8 patch's mean normalised pixel (row-major, as a ViT's patches)."
    def forward(self, x): return torch.cat([x.new_zeros(x.shape[0], 1, 3), F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)], 1)


def test_patch_indices_and_colour_probe(tmp_path):
    root = generate(SynthConfig(n_images=120, image_size=64), tmp_path / 'ds')
    tr, va = load_objects(root, 'train', 96, 64, 8), load_objects(root, 'val', 12, 64, 8)
    for _, objs in (tr, va):
        for row in objs:
            for centre, box, _, _ in row:
                assert 1 <= centre <= 64 and centre in box and len(box) <= 16   # the largest (18 px) span at most 4x4 patches
    C, B, S, K = object_features(PatchColour(), *tr)
    Cv, Bv, Sv, Kv = object_features(PatchColour(), *va)
    assert C.shape == (len(S), 3) and B.shape == (len(S), 9)
    acc = linear_probe(C, K, Cv, Kv, len(COLOURS))
    assert acc > 85, acc                                              # the centre patch is mostly the object's own colour
    shuffled = K[torch.randperm(len(K), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(C, shuffled, Cv, Kv, len(COLOURS)) < 50        # nothing to learn: about chance (1/8 .. majority)


def test_reinit_redraws_every_weight():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)); m[1].weight.data.fill_(3.)
    r = reinit(m)
    assert not torch.equal(r[0].weight, m[0].weight) and torch.equal(r[1].weight, torch.ones(4))
    assert torch.equal(m[1].weight, torch.full((4,), 3.))               # the source is left as it was


def test_roc_auc_by_hand():
    # pairs (1,0) (1,1) (2,0) (2,1): three wins and one tie -> (3 + 0.5) / 4
    test = torch.tensor
    assert roc_auc(test([1., 2.]), test([0., 1.])) == 0.875
    assert roc_auc(test([0.]), test([1., 2.])) == 0.0
    assert torch.equal(shifted(4, 1), test([1, 2, 3, 0]))     # every caption gets another record's image


def test_oracle_tokens_follow_the_records_scene(tmp_path):
    "oracle_vqa.py's VE path: each hypothesis' oracle row holds exactly its own image's objects (shape ids, centres)."
    from oracle_vqa import scene_table, use_oracle_images, OracleVision, MAX_OBJECTS
    from vlnb.data.synth import SHAPES, load_scenes
    from vlnb.recipes.train_ve import ve_data
    root = generate(SynthConfig(n_images=60, image_size=64), tmp_path / 'ds')
    table = scene_table(root, 64)
    train, val = ve_data(root, 64, 'none', 'val', 20, 0, extra_hypotheses=1)
    scenes = {**load_scenes(root, 'train'), **load_scenes(root, 'val')}
    for ds in (train, val):
        use_oracle_images(ds, table['index'])
        for i in (0, len(ds) - 1):
            row = int(ds[i]['image'].item())
            objs = scenes[ds.records[i]['image']]['objects']
            n = len(objs)
            assert [SHAPES[k - 1] for k in table['attrs'][row, 1:n + 1, 0].tolist()] == [o['shape'] for o in objs]
            assert table['mask'][row].tolist() == [1.] * (n + 1) + [0.] * (MAX_OBJECTS - n)
            assert torch.allclose(table['centres'][row, 1:n + 1], torch.tensor([o['centre'] for o in objs], dtype=torch.float) / 64)
    tokens = OracleVision(table, 16)(torch.tensor([[float(table['index'][val.records[0]['image']])]]))
    n = len(scenes[val.records[0]['image']]['objects'])
    assert tokens.shape == (1, MAX_OBJECTS + 1, 16) and tokens[0, n + 1:].abs().sum() == 0 and tokens[0, 1:n + 1].abs().sum(-1).min() > 0   # [CLS] starts at zero
    blank = OracleVision(table, 16)(torch.zeros(1, 3, 64, 64))                  # a blind model's blank image: no objects
    assert table['mask'][0].tolist() == [1.] + [0.] * MAX_OBJECTS and blank[0, 1:].abs().sum() == 0
    from oracle_vqa import curriculum_data
    first = curriculum_data(train, 'exist', table['index'])             # the curriculum's subset is a new dataset: fed rows too
    assert 0 < len(first) < len(train) and {r['program']['op'] for r in first.records} == {'exist'}
    for i in (0, len(first) - 1):
        assert first[i]['image'].tolist() == [float(table['index'][first.records[i]['image']])]
    assert curriculum_data(train, 'exist')[0]['image'].shape == (3, 64, 64)   # without the table: pixels, as the blank row


def test_bias_product_loss_by_hand():
    "oracle_vqa.py's BiasProduct: CE of softmax(z + z_bias) (the log-softmax constants cancel); the bias gets no gradient."
    import math
    from types import SimpleNamespace
    from oracle_vqa import BiasProduct
    class Fixed(nn.Module):
        def __init__(self, z): super().__init__(); self.z = nn.Parameter(torch.tensor(z))
        def logits(self, batch): return self.z
        def forward(self, batch): return SimpleNamespace(loss=None, loss_ce=None, logits=self.z, labels=batch['label'])
    main, bias = Fixed([[1., 0., 0.]]), Fixed([[0., 2., 0.]])
    pm = BiasProduct(main, bias)
    out = pm(dict(label=torch.tensor([2])))
    assert math.isclose(out.loss.item(), math.log(1 + math.e + math.e ** 2), rel_tol=1e-6)   # z + z_b = (1, 2, 0), label 2
    out.loss.backward()
    assert main.z.grad is not None and bias.z.grad is None and list(pm.parameters()) == [main.z]
    assert torch.equal(pm.logits({}).argmax(-1), torch.tensor([1]))                          # the product predicts class 1
