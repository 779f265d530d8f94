"""File naming (docs/data.md) and util/format_check.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basic import paths
from basic.bigfile import write_bigfile
from basic.errors import DataError
from basic.paths import CaptionStream, mlcmr_streams, nrccr_streams
from util.format_check import main as format_check

REPO = Path(__file__).resolve().parents[1]


def names(streams):
    return [(s.role, s.candidates, s.clean) for s in streams]


# ============ paths ============

def test_dirs_and_presets():
    assert paths.collection_dir('/r', 'vatex') == str(Path('/r/vatex'))
    assert paths.text_dir('/r', 'vatex') == str(Path('/r/vatex/TextData'))
    assert paths.feature_dir('/r', 'vatex', 'i3d_kinetics') == str(Path('/r/vatex/FeatureData/i3d_kinetics'))
    assert paths.PRESETS['vatex'] == {'feature': 'i3d_kinetics', 'dims': 1024}
    assert paths.PRESETS['msrvttcn'] == {'feature': 'resnext101-resnet152', 'dims': 4096}
    assert paths.PRESETS['toy'] == {'feature': 'toy_feature', 'dims': None}


def test_caption_stream_is_frozen_and_checked():
    s = CaptionStream('en', ('a.txt',), 'en')
    with pytest.raises(AttributeError):
        s.role = 'zh'
    with pytest.raises(ValueError, match='clean'):
        CaptionStream('en', ('a.txt',), 'english')


def test_nrccr_streams():
    assert names(nrccr_streams('vatex', 'train')) == [
        ('src', ('vatextrain.caption.txt',), 'en'),
        ('tr', ('vatextrain_google_enc2zh.caption.txt',), 'raw'),
        ('bt', ('vatextrain_google_enc2zh2enc.caption.txt',), 'raw')]       # the reference's hard-coded name
    assert nrccr_streams('m', 'train', 'baidu_enc2de')[2].candidates == ('mtrain_baidu_enc2de2enc.caption.txt',)
    assert names(nrccr_streams('msrvttcn', 'val')) == [
        ('primary', ('msrvttcnval_google_zh2enc.caption.txt', 'msrvttcnval_google_zhc2en.caption.txt'), 'en'),
        ('second', ('msrvttcnval_zh.caption.txt',), 'raw')]
    assert names(nrccr_streams('c', 'test', 'baidu_enc2de')) == [
        ('primary', ('ctest_baidu_de2enc.caption.txt', 'ctest_baidu_dec2en.caption.txt'), 'en'),
        ('second', ('ctest_de.caption.txt',), 'raw')]
    with pytest.raises(ValueError, match='split'):
        nrccr_streams('c', 'dev')
    with pytest.raises(ValueError, match='data_type'):
        nrccr_streams('c', 'val', 'zh')


def test_mlcmr_streams():
    human = [('en', ('Ctrain.caption.txt',), 'en'), ('zh', ('Ctrain_zh.caption.txt',), 'raw')]
    assert names(mlcmr_streams('C', 'train', 'parallel', 'human_label', 'zh')) == human
    assert names(mlcmr_streams('C', 'train', 'parallel', 'human_label', 'en')) == human
    assert names(mlcmr_streams('C', 'train', 'parallel', 'translate', 'zh')) == [
        ('en', ('Ctrain.caption.txt',), 'en'), ('zh', ('Ctrain_google_enc2zh.caption.txt',), 'raw')]
    assert names(mlcmr_streams('C', 'train', 'parallel', 'translate', 'en')) == [
        ('en', ('Ctrain_google_zhc2en.caption.txt', 'Ctrain_google_zh2enc.caption.txt'), 'en'),
        ('zh', ('Ctrain_zh.caption.txt',), 'raw')]
    for label in paths.LABEL_SITUATIONS:
        assert names(mlcmr_streams('C', 'train', 'unparallel', label)) == [
            ('half', ('Ctrain_half.caption.txt',), 'auto')]
    assert names(mlcmr_streams('C', 'val')) == [('en', ('Cval.caption.txt',), 'en'),
                                                ('zh', ('Cval_zh.caption.txt',), 'raw')]
    assert names(paths.mlcmr_val_streams('C', 'test')) == [('en', ('Ctest.caption.txt',), 'en'),
                                                           ('zh', ('Ctest_zh.caption.txt',), 'raw')]
    assert names(mlcmr_streams('C', 'test', target_language='zh')) == [
        ('en', ('Ctest_google_zhc2en.caption.txt', 'Ctest_google_zh2enc.caption.txt'), 'en'),
        ('zh', ('Ctest_zh.caption.txt',), 'raw')]
    assert names(mlcmr_streams('C', 'test', target_language='en')) == [
        ('en', ('Ctest.caption.txt',), 'en'), ('zh', ('Ctest_google_enc2zh.caption.txt',), 'raw')]
    for bad in (dict(train_mode='x'), dict(label_situation='x'), dict(target_language='de')):
        with pytest.raises(ValueError):
            mlcmr_streams('C', 'train', **bad)


def test_resolve_stream_first_existing_wins(tmp_path):
    stream = CaptionStream('primary', ('Cval_google_zh2enc.caption.txt', 'Cval_google_zhc2en.caption.txt'), 'en')
    text = tmp_path / 'C' / 'TextData'
    with pytest.raises(DataError) as e:
        paths.resolve_stream(str(tmp_path), 'C', stream)
    msg = str(e.value)
    assert msg.startswith(str(text)) and 'Cval_google_zh2enc.caption.txt' in msg
    assert 'Cval_google_zhc2en.caption.txt' in msg and "'primary'" in msg
    text.mkdir(parents=True)
    (text / 'Cval_google_zhc2en.caption.txt').write_text('v#zhc2en#0 x\n')
    assert paths.resolve_stream(str(tmp_path), 'C', stream) == str(text / 'Cval_google_zhc2en.caption.txt')
    (text / 'Cval_google_zh2enc.caption.txt').write_text('v#zh2enc#0 x\n')
    assert paths.resolve_stream(str(tmp_path), 'C', stream) == str(text / 'Cval_google_zh2enc.caption.txt')


# ============ format_check ============

VIDEOS = ['vid_1', 'oX9-D0_000019_000029', 'v3']
TAGS = {  # split -> {file suffix: tag}: every file NRCCR and MLCMR read; _half is optional
    'train': {'': 'enc', '_zh': 'zh', '_google_enc2zh': 'enc2zh', '_google_enc2zh2enc': 'enc2zh2enc',
              '_google_zhc2en': 'zhc2en'},
    'val': {'': 'enc', '_zh': 'zh', '_google_zh2enc': 'zh2enc'},            # NRCCR naming
    'test': {'': 'enc', '_zh': 'zh', '_google_enc2zh': 'enc2zh', '_google_zhc2en': 'zhc2en'},
}


def make_collection(root, C='toy', feature='toy_feature', dims=4):
    """A tiny complete collection: 3 videos x 2 captions per file, file orders differing."""
    frames = [f'{v}_{n}' for v in VIDEOS for n in (10, 2, 0)]
    write_bigfile(str(root / C / 'FeatureData' / feature), frames, np.ones((len(frames), dims)))
    text = root / C / 'TextData'
    text.mkdir(parents=True)
    for split, files in TAGS.items():
        for i, (suffix, tag) in enumerate(files.items()):
            rows = [(v, k) for v in VIDEOS for k in (0, 1)]
            rows = rows[i % len(rows):] + rows[:i % len(rows)]            # rotate: every file in its own order
            lines = [f'{v}#{tag}#{k} caption {k} of {v}' for v, k in rows]
            (text / f'{C}{split}{suffix}.caption.txt').write_text('\r\n'.join(lines))
    return root


def run_check(capsys, root, *extra, C='toy'):
    code = format_check(['--rootpath', str(root), '--collection', C, *extra])
    return code, capsys.readouterr().out


def test_complete_collection(tmp_path, capsys):
    root = make_collection(tmp_path)
    code, out = run_check(capsys, root)
    assert code == 0, out
    last = out.strip().splitlines()[-1]
    assert last == 'collection complete'
    assert 'MISSING' not in out and 'BAD' not in out
    assert 'OPTIONAL' in out and 'toytrain_half.caption.txt' in out              # will be derived
    assert 'video2frames.txt absent; derived from id.txt (3 videos)' in out
    assert out.count('OK       captions') == 12                                  # every distinct file, once


def test_missing_file_is_named(tmp_path, capsys):
    root = make_collection(tmp_path)
    (root / 'toy' / 'TextData' / 'toytest_zh.caption.txt').unlink()
    code, out = run_check(capsys, root, '--preset', 'toy')
    assert code == 1
    missing = [line for line in out.splitlines() if line.startswith('MISSING')]
    assert len(missing) == 1 and 'toytest_zh.caption.txt' in missing[0]
    assert str(root / 'toy' / 'TextData' / 'toytest_zh.caption.txt') in missing[0]
    assert out.strip().splitlines()[-1] == '1 problem'


def test_bad_caption_partner_gap_and_frames(tmp_path, capsys):
    root = make_collection(tmp_path)
    text = root / 'toy' / 'TextData'
    with open(text / 'toyval_zh.caption.txt', 'a') as f:
        f.write('\nv3#zh#7\n')                                                    # line 7: no text
    with open(text / 'toytest_google_zhc2en.caption.txt', 'a') as f:
        f.write('\nv3#zhc2en#5 extra caption of v3\nghost#zhc2en#0 a video without frames\n')
    code, out = run_check(capsys, root)
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith('BAD')]
    assert any(f'{text / "toyval_zh.caption.txt"}:7: ' in line for line in bad)
    # two extra primary captions lack a zh partner; NRCCR test and MLCMR test zh read this same pair
    pairing = [line for line in bad if line.startswith('BAD      pairing')]
    assert len(pairing) == 1 and 'NRCCR test, MLCMR test zh' in pairing[0]
    assert '2 of 8 captions' in pairing[0] and 'v3#zhc2en#5' in pairing[0]
    frames = [line for line in bad if 'no frames' in line]
    assert len(frames) == 1 and 'ghost' in frames[0]
    assert out.strip().splitlines()[-1] == '3 problems' and len(bad) == 3


def test_bad_features_and_video2frames(tmp_path, capsys):
    root = make_collection(tmp_path, C='vatex', feature='i3d_kinetics', dims=4)
    code, out = run_check(capsys, root, C='vatex')
    assert code == 1 and 'BAD      feature folder' in out and 'the preset expects 1024' in out
    fdir = root / 'vatex' / 'FeatureData' / 'i3d_kinetics'
    (fdir / 'video2frames.txt').write_text("{'vid_1': ['vid_1_0', 'vid_1_99']}")
    code, out = run_check(capsys, root, '--feature', 'i3d_kinetics', '--preset', 'toy', C='vatex')
    assert code == 1 and '1 frame ids not in id.txt (first: vid_1_99)' in out
    (fdir / 'feature.bin').write_bytes(b'\0' * 10)
    code, out = run_check(capsys, root, '--preset', 'toy', '--feature', 'i3d_kinetics', C='vatex')
    assert code == 1 and 'truncated download?' in out


def test_script_from_repo_root(tmp_path):
    root = make_collection(tmp_path)
    run = subprocess.run([sys.executable, 'util/format_check.py', '--rootpath', str(root), '--collection', 'toy'],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith('collection complete')


def test_unknown_collection_needs_feature(tmp_path, capsys):
    with pytest.raises(SystemExit):
        format_check(['--rootpath', str(tmp_path), '--collection', 'mystery'])
    assert '--feature' in capsys.readouterr().err
