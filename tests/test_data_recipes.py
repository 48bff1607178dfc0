"""Fuller fixture tests for the dataset converters in `vlnb.data.recipes` (the notebook keeps only small examples).

The fixtures under tests/fixtures/<dataset>/ are tiny files written in each dataset's official format; malformed
variants are either committed (bad_* folders) or made here from the good ones in a temporary folder.
"""
import json, os, pickle, random, shutil, subprocess, sys
from pathlib import Path
import pytest

FIX = Path(__file__).resolve().parent / 'fixtures'
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))   # works without an (editable) install too
from vlnb.data import recipes as R

TASK_OF = {'retrieval': 'retrieval', 'caption': 'caption', 'pretrain': 'pretrain', 'vqa': 'vqa', 'nlvr': 'nlvr', 've': 've', 'grounding': 'grounding'}


def load(p):
    return json.loads(Path(p).read_text(encoding='utf-8'))


def validate_dir(out):
    "Every record file a converter wrote validates against its task's contract; returns {file: n}."
    counts = {}
    for p in sorted(Path(out).glob('*.json')):
        if p.name in ('answer_list.json', 'grounding_proposals.json'): continue
        task = TASK_OF[p.name.split('_')[0]]
        counts[p.name] = R.validate_records(p, task)
    assert not list(Path(out).glob('.*.tmp')), 'temporary files left behind'
    return counts


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst, ignore=shutil.ignore_patterns('bad_*'))
    return dst


# ---------------------------------------------------------------- good inputs: counts, contents, contract

def test_coco(tmp_path):
    s = R.convert_coco(FIX / 'coco', tmp_path)
    assert validate_dir(tmp_path) == {'caption_test.json': 2, 'caption_train.json': 6, 'caption_val.json': 1, 'pretrain_coco.json': 3,
                                      'retrieval_test.json': 2, 'retrieval_train.json': 6, 'retrieval_val.json': 1}
    assert s['skipped'] == 0
    tr = load(tmp_path / 'retrieval_train.json')
    assert [r['image_id'] for r in tr] == [9, 9, 42, 42, 42, 25]
    assert tr[4]['caption'] == 'A pair of dogs outside.' and tr[3]['caption'] == 'Dogs running on snow.'  # stripped
    val = load(tmp_path / 'retrieval_val.json')
    assert val == [{'image': 'val2014/COCO_val2014_000000000073.jpg', 'caption': ['A red bus on a street.', 'A double decker bus.'], 'image_id': 73}]
    assert load(tmp_path / 'caption_train.json') == tr


def test_coco_without_restval_and_prefix(tmp_path):
    s = R.convert_coco(FIX / 'coco' / 'dataset_coco.json', tmp_path, image_prefix='coco/', restval=False)
    assert s['images'] == {'train': 2, 'val': 1, 'test': 2}
    assert [r['image'] for r in load(tmp_path / 'pretrain_coco.json')] == ['coco/train2014/COCO_train2014_000000000009.jpg',
                                                                            'coco/train2014/COCO_train2014_000000000025.jpg']


def test_flickr30k(tmp_path):
    R.convert_flickr30k(FIX / 'flickr30k', tmp_path)
    assert validate_dir(tmp_path)['retrieval_train.json'] == 3
    te = load(tmp_path / 'caption_test.json')
    assert te == [{'image': 'flickr30k-images/1009434119.jpg', 'caption': ['A dog runs across the grass.', 'A black and white dog is running.'],
                   'image_id': 1009434119}]


def test_vqa(tmp_path):
    s = R.convert_vqa(FIX / 'vqa', tmp_path, vg_qa=FIX / 'vg' / 'question_answers.json', vg_image_data=FIX / 'vg' / 'image_data.json',
                      vg_only_listed=False)
    assert validate_dir(tmp_path) == {'vqa_test.json': 2, 'vqa_train.json': 4, 'vqa_val.json': 2, 'vqa_vg.json': 4}
    val = load(tmp_path / 'vqa_val.json')
    assert val[0]['answer'] == ['dogs'] * 6 + ['dog'] * 4 and val[0]['image'] == 'val2014/COCO_val2014_000000000042.jpg'
    assert all(r['dataset'] == 'vqa' for r in val)
    test = load(tmp_path / 'vqa_test.json')
    assert test[0] == {'question_id': 1000, 'image': 'test2015/COCO_test2015_000000000001.jpg', 'question': 'What is on the plate?',
                       'image_id': 1, 'dataset': 'vqa'}
    # the answer list counts each question's multiple_choice_answer over train + val: yes x2, the rest x1 (ties alphabetical)
    assert load(tmp_path / 'answer_list.json') == ['yes', '1', 'dogs', 'horse', 'leaves']
    vg = load(tmp_path / 'vqa_vg.json')
    assert [r['question_id'] for r in vg] == [986768, 986769, 5, 6] and {r['dataset'] for r in vg} == {'vg'}
    assert vg[3] == {'question_id': 6, 'image': 'VG_100K/10.jpg', 'question': 'What are the dogs doing?', 'image_id': 10,
                     'answer': 'playing', 'dataset': 'vg'}
    assert s['skipped'] == 0


def test_vqa_answer_list_options(tmp_path):
    R.convert_vqa(FIX / 'vqa', tmp_path, answer_list_size=2)
    assert load(tmp_path / 'answer_list.json') == ['yes', '1']
    R.convert_vqa(FIX / 'vqa', tmp_path, min_answer_count=2)
    assert load(tmp_path / 'answer_list.json') == ['yes']


def test_vg_regions(tmp_path):
    s = R.convert_vg(FIX / 'vg' / 'region_descriptions.json', tmp_path)
    assert validate_dir(tmp_path) == {'pretrain_vg.json': 3} and s['clipped_boxes'] == 1
    recs = load(tmp_path / 'pretrain_vg.json')
    assert recs[0]['caption'] == ['the clock is green in colour', 'a street scene', 'shade is along the street']
    assert recs[0]['regions'][0] == {'bbox': [421, 57, 82, 139], 'caption': 'the clock is green in colour'}
    assert [r['image'] for r in recs] == ['VG_100K_2/1.jpg', 'VG_100K/10.jpg', 'VG_100K/107899.jpg']


def test_vg_exclude_coco(tmp_path):
    excl = tmp_path / 'excl.json'; excl.write_text('[42]')
    s = R.convert_vg(FIX / 'vg', tmp_path / 'o', exclude_coco=excl)
    assert s['excluded_coco_images'] == 1 and [r['image_id'] for r in load(tmp_path / 'o' / 'pretrain_vg.json')] == [1, 107899]


def test_vg_without_image_data_keeps_boxes(tmp_path):
    src = tmp_path / 'vg'; src.mkdir(); shutil.copy(FIX / 'vg' / 'region_descriptions.json', src)
    s = R.convert_vg(src, tmp_path / 'o')
    recs = load(tmp_path / 'o' / 'pretrain_vg.json')
    assert s['clipped_boxes'] == 0 and recs[0]['regions'][2]['bbox'] == [700, 500, 150, 120] and recs[0]['image'] == 'VG_100K/1.jpg'


def test_cc3m_pattern_and_val_split(tmp_path):
    val = tmp_path / 'Validation_GCC-1.1.0-Validation.tsv'
    shutil.copy(FIX / 'cc3m' / 'Train_GCC-training.tsv', val)
    s = R.convert_cc3m(val, tmp_path / 'o', image_pattern='validation/{index:05d}.jpg')
    recs = load(tmp_path / 'o' / 'pretrain_cc3m_val.json')
    assert s['missing_images'] == 0 and len(recs) == 4
    assert recs[3] == {'image': 'validation/00003.jpg', 'caption': 'interior design of modern living room', 'image_id': 'cc3m_val_3'}
    validate_dir(tmp_path / 'o')


def test_cc3m_mapping_json(tmp_path):
    m = tmp_path / 'm.json'; m.write_text(json.dumps({'http://example.org/b/2.jpg': 'x/2.jpg'}))
    s = R.convert_cc3m(FIX / 'cc3m', tmp_path / 'o', mapping=m)
    assert s['missing_images'] == 3 and load(tmp_path / 'o' / 'pretrain_cc3m.json')[0]['image'] == 'x/2.jpg'


def test_cc3m_img2dataset_folder(tmp_path):
    # img2dataset --output_format files: <shard>/<key>.jpg + <shard>/<key>.json (url, caption, key, status); failed downloads have no image
    d = tmp_path / 'cc3m_imgs' / '00000'; d.mkdir(parents=True)
    for key, url, ok in [('000000000', 'http://example.org/a/1.jpg', True), ('000000001', 'http://example.org/b/2.jpg', False),
                         ('000000003', 'http://example.org/d/4.jpg', True)]:
        (d / f'{key}.json').write_text(json.dumps({'url': url, 'caption': 'x', 'key': key, 'status': 'success' if ok else 'failed_to_download'}))
        if ok: (d / f'{key}.jpg').write_bytes(b'')
    s = R.convert_cc3m(FIX / 'cc3m', tmp_path / 'o', mapping=tmp_path / 'cc3m_imgs', image_root=tmp_path / 'cc3m_imgs', image_prefix='cc3m_imgs')
    recs = load(tmp_path / 'o' / 'pretrain_cc3m.json')
    assert s['missing_images'] == 2 and [(r['image'], r['image_id']) for r in recs] == [('cc3m_imgs/00000/000000000.jpg', 'cc3m_0'),
                                                                                        ('cc3m_imgs/00000/000000003.jpg', 'cc3m_3')]


def test_sbu_json_and_txt_agree(tmp_path):
    R.convert_sbu(FIX / 'sbu' / 'sbu-captions-all.json', tmp_path / 'a', image_pattern='{basename}')
    R.convert_sbu(FIX / 'sbu' / 'txt', tmp_path / 'b', image_pattern='{basename}')
    assert load(tmp_path / 'a' / 'pretrain_sbu.json') == load(tmp_path / 'b' / 'pretrain_sbu.json')
    assert validate_dir(tmp_path / 'a') == {'pretrain_sbu.json': 3}


def test_nlvr2(tmp_path):
    R.convert_nlvr2(FIX / 'nlvr2', tmp_path, image_prefix='nlvr2/images')
    assert validate_dir(tmp_path) == {'nlvr_test.json': 1, 'nlvr_train.json': 3, 'nlvr_val.json': 2}
    tr, dev = load(tmp_path / 'nlvr_train.json'), load(tmp_path / 'nlvr_val.json')
    assert tr[2]['images'] == ['nlvr2/images/train/7/train-3744-1-img0.png', 'nlvr2/images/train/7/train-3744-1-img1.png']
    assert [r['label'] for r in tr] == [False, True, True]
    assert dev[1] == {'images': ['nlvr2/images/dev/dev-850-2-img0.png', 'nlvr2/images/dev/dev-850-2-img1.png'],
                      'sentence': 'There is a bus in each image.', 'label': False, 'identifier': 'dev-850-2-1'}


def test_snli_ve(tmp_path):
    s = R.convert_snli_ve(FIX / 'snli_ve', tmp_path)
    assert validate_dir(tmp_path) == {'ve_test.json': 1, 've_train.json': 3, 've_val.json': 1} and s['no_gold_label'] == 1
    assert load(tmp_path / 've_train.json')[0] == {'image': 'flickr30k-images/2248275918.jpg', 'sentence': 'There are women showing affection.',
                                                   'label': 'entailment', 'pair_id': '2248275918.jpg#0r1e'}


def test_snli_ve_id_without_extension(tmp_path):
    src = copy_fixture('snli_ve', tmp_path)
    rows = [json.loads(l) for l in (src / 'snli_ve_test.jsonl').read_text().splitlines()]
    rows[0]['Flikr30kID'] = '1009434119'
    (src / 'snli_ve_test.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    R.convert_snli_ve(src, tmp_path / 'o', image_prefix='')
    assert load(tmp_path / 'o' / 've_test.json')[0]['image'] == '1009434119.jpg'


def test_refcoco(tmp_path):
    s = R.convert_refcoco(FIX / 'refcoco+', tmp_path, dets=FIX / 'refcoco+' / 'dets.json')
    assert validate_dir(tmp_path) == {'grounding_testA.json': 1, 'grounding_testB.json': 1, 'grounding_train.json': 2, 'grounding_val.json': 2}
    assert s['refs'] == {'train': 1, 'testA': 1, 'val': 1, 'testB': 1} and s['proposal_images_missing'] == 0
    val = load(tmp_path / 'grounding_val.json')
    assert [r['text'] for r in val] == ['brown dog', 'big dog lying down'] and val[0]['bbox'] == [10.0, 20.0, 100.0, 80.0]
    assert val[0]['image'] == 'train2014/COCO_train2014_000000000049.jpg' and val[0]['ref_id'] == 2
    props = load(tmp_path / 'grounding_proposals.json')
    assert props == {'581857': [[100.0, 295.0, 140.0, 180.0], [298.0, 101.0, 121.0, 199.0]], '49': [[11.0, 19.0, 99.0, 82.0]]}


def test_refcoco_refer_style_dets(tmp_path):
    dets = tmp_path / 'dets.json'
    dets.write_text(json.dumps({'dets': [{'box': [1, 2, 3, 4], 'image_id': 49, 'score': 0.5}]}))
    R.convert_refcoco(FIX / 'refcoco+', tmp_path / 'o', dets=dets)
    assert load(tmp_path / 'o' / 'grounding_proposals.json') == {'49': [[1, 2, 3, 4]]}


def test_refcoco_albef_style_dets(tmp_path):
    dets = tmp_path / 'dets.json'
    dets.write_text(json.dumps({'49': [[1, 2, 3, 4, 0.9, 18]], '12345': [[0, 0, 1, 1]]}))
    s = R.convert_refcoco(FIX / 'refcoco+', tmp_path / 'o', dets=dets)
    assert load(tmp_path / 'o' / 'grounding_proposals.json') == {'49': [[1, 2, 3, 4]]} and s['proposal_images_missing'] == 1


# ---------------------------------------------------------------- malformed inputs: clear errors, or skip and count

@pytest.mark.parametrize('fn, src, match', [
    (R.convert_coco, 'coco/bad_no_sentences', r"bad_no_sentences/dataset_coco\.json: record 3 \(filename='COCO_val2014_000000000073\.jpg'\): field 'sentences'"),
    (R.convert_vqa, 'vqa/bad_9_answers', r"bad_9_answers/v2_mscoco_train2014_annotations\.json: record 1 \(question_id=9001\): field 'answers': has 9 entries"),
    (R.convert_vqa, 'vqa/bad_missing_annotation', r"bad_missing_annotation/v2_OpenEnded_mscoco_train2014_questions\.json: record 2 \(question_id=25000\)"),
    (R.convert_vg, 'vg/bad_missing_phrase', r"bad_missing_phrase/region_descriptions\.json: record 1 \(id=10, region_id=2001\): field 'regions\[0\]\.phrase'"),
    (R.convert_cc3m, 'cc3m/bad_no_tab', r'bad_no_tab/Train_GCC-training\.tsv: record 2 \(line 2\)'),
    (R.convert_nlvr2, 'nlvr2/bad_label', r"bad_label/dev\.json: record 2 \(line 2\) \(identifier='dev-850-2-1'\): field 'label'"),
    (R.convert_snli_ve, 'snli_ve/bad_label', r"bad_label/snli_ve_dev\.jsonl: record 1 \(line 1\) .*field 'gold_label'"),
    (R.convert_refcoco, 'refcoco+/bad_ann_id', r"bad_ann_id/refs\(unc\)\.p: record 2 \(ref_id=2\): field 'ann_id': 777"),
])
def test_committed_bad_fixtures(fn, src, match, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(R.BadRecord, match=match): fn(FIX / src, out)
    assert not out.exists() or not any(out.iterdir()), 'a failed conversion must leave no output and no temp file'
    s = fn(FIX / src, out, skip_bad=True)
    assert s['skipped'] >= 1 and s['skipped_examples'][0].startswith(str(FIX / src))
    validate_dir(out)


def test_skip_bad_keeps_the_rest(tmp_path):
    s = R.convert_vg(FIX / 'vg' / 'bad_missing_phrase', tmp_path, image_data=FIX / 'vg' / 'image_data.json', skip_bad=True)
    recs = load(tmp_path / 'pretrain_vg.json')
    assert s['skipped'] == 1 and [len(r['regions']) for r in recs] == [3, 1, 1]  # only the bad region is dropped
    s = R.convert_nlvr2(FIX / 'nlvr2' / 'bad_label', tmp_path, skip_bad=True)
    assert s['files'] == {'nlvr_val.json': 1} and s['skipped'] == 1


def test_failed_run_leaves_previous_output(tmp_path):
    R.convert_nlvr2(FIX / 'nlvr2', tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(R.BadRecord): R.convert_nlvr2(FIX / 'nlvr2' / 'bad_label', tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def mutate_json(path, fn):
    d = load(path); fn(d); Path(path).write_text(json.dumps(d))


def test_karpathy_bad_split(tmp_path):
    src = copy_fixture('coco', tmp_path)
    mutate_json(src / 'dataset_coco.json', lambda d: d['images'][4].__setitem__('split', 'dev'))
    with pytest.raises(R.BadRecord, match=r"dataset_coco\.json: record 4 .*field 'split': expected one of"): R.convert_coco(src, tmp_path / 'o')
    mutate_json(src / 'dataset_coco.json', lambda d: d['images'][4].pop('cocoid'))
    with pytest.raises(R.BadRecord, match=r"record 4 .*field 'split'"): R.convert_coco(src, tmp_path / 'o')


def test_vqa_bad_cases(tmp_path):
    src = copy_fixture('vqa', tmp_path)
    a = src / 'v2_mscoco_val2014_annotations.json'
    orig = load(a)
    mutate_json(a, lambda d: d['annotations'].append(dict(d['annotations'][0], question_id=77)))
    with pytest.raises(R.BadRecord, match=r"v2_mscoco_val2014_annotations\.json: record 2 \(question_id=77\): field 'question_id': has no question"):
        R.convert_vqa(src, tmp_path / 'o')
    a.write_text(json.dumps(orig)); mutate_json(a, lambda d: d['annotations'][1].__setitem__('image_id', 5))
    with pytest.raises(R.BadRecord, match=r"v2_mscoco_val2014_annotations\.json: record 1 \(question_id=42001\): field 'image_id'"):
        R.convert_vqa(src, tmp_path / 'o')
    a.unlink()
    with pytest.raises(FileNotFoundError, match='v2_mscoco_val2014_annotations.json: missing'): R.convert_vqa(src, tmp_path / 'o')
    with pytest.raises(FileNotFoundError, match='no v2_OpenEnded'): R.convert_vqa(tmp_path / 'o', tmp_path / 'o2')


def test_vg_box_outside_image(tmp_path):
    src = copy_fixture('vg', tmp_path)
    mutate_json(src / 'region_descriptions.json', lambda d: d[2]['regions'][0].update(x=700, y=10))  # image 107899 is 640 wide
    with pytest.raises(R.BadRecord, match=r"region_descriptions\.json: record 2 \(id=107899, region_id=3001\): field 'regions\[0\]': box .* no area inside the 640x480 image"):
        R.convert_vg(src, tmp_path / 'o')
    s = R.convert_vg(src, tmp_path / 'o', skip_bad=True)
    assert s['skipped'] == 1 and [r['image_id'] for r in load(tmp_path / 'o' / 'pretrain_vg.json')] == [1, 10]  # no region left: image dropped


def test_cc3m_skip_bad_keeps_row_numbers(tmp_path):
    "A skipped bad line must not shift the row numbers that name the images ({index}) and the image ids."
    p = tmp_path / 'Train_GCC-training.tsv'
    p.write_text('first caption\thttp://a/0.jpg\nno tab here\nthird caption\thttp://a/2.jpg\n')
    s = R.convert_cc3m(p, tmp_path / 'o', image_pattern='{index}.jpg', skip_bad=True)
    assert s['skipped'] == 1 and [(r['image'], r['image_id']) for r in load(tmp_path / 'o' / 'pretrain_cc3m.json')] == [('0.jpg', 'cc3m_0'), ('2.jpg', 'cc3m_2')]


def test_web_pairs_bad_url_and_lengths(tmp_path):
    p = tmp_path / 'Train_GCC-training.tsv'; p.write_text('a caption\tftp://x/1.jpg\n')
    with pytest.raises(R.BadRecord, match=r"Train_GCC-training\.tsv: record 1 \(line 1\): field 'url'"): R.convert_cc3m(p, tmp_path / 'o')
    j = tmp_path / 'sbu-captions-all.json'; j.write_text(json.dumps({'image_urls': ['http://a/1.jpg', 'http://a/2.jpg'], 'captions': ['one']}))
    with pytest.raises(ValueError, match='different lengths'): R.convert_sbu(j, tmp_path / 'o2')
    assert not (tmp_path / 'o2' / 'pretrain_sbu.json').exists()
    d = tmp_path / 'txt'; shutil.copytree(FIX / 'sbu' / 'txt', d)
    with open(d / 'SBU_captioned_photo_dataset_captions.txt', 'a') as f: f.write('one caption too many\n')
    with pytest.raises(ValueError, match='different numbers of lines'): R.convert_sbu(d, tmp_path / 'o3')


def test_nlvr2_bad_identifier_and_directory(tmp_path):
    src = copy_fixture('nlvr2', tmp_path)
    rows = [json.loads(l) for l in (src / 'train.json').read_text().splitlines()]
    del rows[1]['directory']
    (src / 'train.json').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    with pytest.raises(R.BadRecord, match=r"train\.json: record 2 \(line 2\) \(identifier='train-10171-0-1'\): field 'directory'"): R.convert_nlvr2(src, tmp_path / 'o')
    rows[1]['directory'] = 57; rows[0]['identifier'] = 'dev-1-2-3'
    (src / 'train.json').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    with pytest.raises(R.BadRecord, match=r"record 1 \(line 1\) \(identifier='dev-1-2-3'\): field 'identifier': split 'dev' in the train file"):
        R.convert_nlvr2(src, tmp_path / 'o')
    (src / 'train.json').unlink()
    (src / 'dev.json').write_text('{"identifier": "dev-1-2-3", \n')
    with pytest.raises(ValueError, match=r'dev\.json: line 1: invalid json'): R.convert_nlvr2(src, tmp_path / 'o')


def test_refcoco_bad_cases(tmp_path):
    src = copy_fixture('refcoco+', tmp_path)
    refs = R.load_refs(src / 'refs(unc).p')
    def write(rs):
        with open(src / 'refs(unc).p', 'wb') as f: pickle.dump(rs, f, protocol=2)
    write([dict(refs[0], image_id=49)])
    with pytest.raises(R.BadRecord, match=r"refs\(unc\)\.p: record 0 \(ref_id=0\): field 'image_id': 49 differs from annotation 1719310"):
        R.convert_refcoco(src, tmp_path / 'o')
    inst = load(src / 'instances.json'); inst['annotations'][0]['bbox'] = [600.0, 10.0, 100.0, 10.0]
    (src / 'instances.json').write_text(json.dumps(inst)); write(refs)
    with pytest.raises(R.BadRecord, match=r"record 0 \(ref_id=0\): field 'ann_id': box .* leaves the 640x480 image"):
        R.convert_refcoco(src, tmp_path / 'o')
    with pytest.raises(FileNotFoundError, match=r'refs\(umd\)\.p: missing'): R.convert_refcoco(src, tmp_path / 'o', split_by='umd')


class Evil:
    def __reduce__(self): return (os.system, ('echo pwned',))


def test_refs_pickle_runs_nothing(tmp_path):
    p = tmp_path / 'refs(unc).p'
    with open(p, 'wb') as f: pickle.dump([{'ref_id': 1, 'x': Evil()}], f, protocol=2)
    with pytest.raises(ValueError, match=r'not a refs pickle: refusing to load posix\.system'): R.load_refs(p)


# ---------------------------------------------------------------- streaming json and the contract check

def test_stream_matches_json_load_random(tmp_path):
    rng = random.Random(0)
    def val(depth=0):
        k = rng.randrange(7 if depth < 3 else 4)
        if k == 0: return rng.randint(-10**6, 10**6)
        if k == 1: return rng.choice([rng.random() * 10**rng.randint(-5, 5), -1.5e-7, 0.0])
        if k == 2: return ''.join(rng.choice('ab"\\/é\n{}[],: 0') for _ in range(rng.randrange(8)))
        if k == 3: return rng.choice([True, False, None])
        if k in (4, 5): return [val(depth + 1) for _ in range(rng.randrange(4))]
        return {f'k{i}': val(depth + 1) for i in range(rng.randrange(4))}
    items = [val() for _ in range(300)]
    doc = {'before': [val() for _ in range(50)], 'items': items, 'after': 1}
    p = tmp_path / 'x.json'
    for indent in (None, 1):
        p.write_text(json.dumps(doc, indent=indent, ensure_ascii=False), encoding='utf-8')
        for cs in (1, 2, 5, 64, 4096):
            assert list(R.iter_json_array(p, 'items', chunk_size=cs)) == items
        p.write_text(json.dumps(items, indent=indent), encoding='utf-8')
        assert list(R.iter_json_array(p, chunk_size=3)) == items


def test_validate_albef_released_formats():
    # ALBEF's published record shapes (reference/albef_xvlm_vicha.md 1.7) pass the contract check
    assert R.validate_records([{'image': 'val2014/a.jpg', 'caption': 'x', 'image_id': 'coco_1'}], 'retrieval') == 1
    assert R.validate_records([{'images': ['dev/a-img0.png', 'dev/a-img1.png'], 'sentence': 's', 'label': 'False'}], 'nlvr') == 1
    assert R.validate_records([{'question_id': 1, 'question': 'q', 'answer': 'x', 'image': 'VG_100K/1.jpg', 'dataset': 'vg'}], 'vqa') == 1
    with pytest.raises(ValueError, match='unknown task'): R.validate_records([], 'nope')
    with pytest.raises(R.BadRecord, match=r"recs: record 1: field 'caption'"):
        R.validate_records([{'image': 'a.jpg', 'caption': 'x', 'image_id': 1}, {'image': 'a.jpg', 'caption': [], 'image_id': 1}], 'caption', 'recs')
    with pytest.raises(R.BadRecord, match=r"field 'regions\[0\]'"):
        R.validate_records([{'image': 'a.jpg', 'caption': 'x', 'image_id': 1, 'regions': [{'bbox': [0, 0, 1], 'caption': 'y'}]}], 'pretrain')


# ---------------------------------------------------------------- the command line, as a user runs it

def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, '-m', 'vlnb.data.recipes', *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli(tmp_path):
    r = run_cli('refcoco+', '--src', FIX / 'refcoco+', '--out', tmp_path, '--dets', FIX / 'refcoco+' / 'dets.json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['files']['grounding_train.json'] == 2 and (tmp_path / 'grounding_proposals.json').exists()
    r = run_cli('vqa', '--src', FIX / 'vqa' / 'bad_9_answers', '--out', tmp_path / 'v')
    assert r.returncode == 1 and 'bad_9_answers/v2_mscoco_train2014_annotations.json: record 1 (question_id=9001)' in r.stderr
    r = run_cli('vqa', '--src', FIX / 'vqa' / 'bad_9_answers', '--out', tmp_path / 'v', '--skip-bad')
    assert r.returncode == 0 and json.loads(r.stdout)['skipped'] == 2 and 'skipped 2 bad record(s)' in r.stderr
    r = run_cli('--help')
    assert r.returncode == 0 and all(n in r.stdout for n in R.RECIPES)


def test_documented_commands_parse():
    "Every `python -m vlnb.data.recipes ...` command in data_recipes/*.md names a real recipe and real flags."
    import shlex
    parser, n = R.build_parser(), 0
    for md in sorted((ROOT / 'data_recipes').glob('*.md')):
        text = md.read_text(encoding='utf-8').replace('\\\n', ' ')
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith('python -m vlnb.data.recipes') or '<' in line: continue
            args = shlex.split(line, comments=True)[3:]
            ns = parser.parse_args(args)  # argparse exits (SystemExit) on an unknown recipe or flag
            assert ns.dataset in R.RECIPES
            n += 1
    assert n >= 10


def test_outputs_load_in_data_core(tmp_path):
    "Converted records pass the field checks of the task datasets in vlnb.data.core (the loader side of the contract)."
    C = pytest.importorskip('vlnb.data.core')
    R.convert_coco(FIX / 'coco', tmp_path / 'coco')
    R.convert_vqa(FIX / 'vqa', tmp_path / 'vqa', vg_qa=FIX / 'vg' / 'question_answers.json', vg_only_listed=False)
    R.convert_vg(FIX / 'vg', tmp_path / 'vg'); R.convert_nlvr2(FIX / 'nlvr2', tmp_path / 'nlvr2')
    R.convert_snli_ve(FIX / 'snli_ve', tmp_path / 've'); R.convert_refcoco(FIX / 'refcoco+', tmp_path / 'ref')
    cases = [(C.PretrainDataset, 'coco/pretrain_coco.json', 'train', 3), (C.PretrainDataset, 'vg/pretrain_vg.json', 'train', 3),
             (C.RetrievalDataset, 'coco/retrieval_train.json', 'train', 6), (C.RetrievalDataset, 'coco/retrieval_test.json', 'test', 2),
             (C.CaptionDataset, 'coco/caption_train.json', 'train', 6), (C.CaptionDataset, 'coco/caption_val.json', 'val', 1),
             (C.NLVRDataset, 'nlvr2/nlvr_train.json', 'train', 3), (C.VEDataset, 've/ve_train.json', 'train', 3),
             (C.GroundingDataset, 'ref/grounding_train.json', 'train', 2), (C.GroundingDataset, 'ref/grounding_testB.json', 'test', 1)]
    for cls, f, split, n in cases:
        ds = cls(tmp_path / f, image_root=tmp_path / f.split('/')[0], split=split)
        assert len(ds.records) == n and not ds.skipped, (cls.__name__, f)
    vqa = C.VQADataset([tmp_path / 'vqa' / 'vqa_train.json', tmp_path / 'vqa' / 'vqa_vg.json'], image_root=tmp_path / 'vqa',
                       answer_list=tmp_path / 'vqa' / 'answer_list.json', split='train')
    assert len(vqa.records) == 8
    assert len(C.VQADataset(tmp_path / 'vqa' / 'vqa_test.json', image_root=tmp_path / 'vqa', split='test').records) == 2
