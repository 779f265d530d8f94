"""BigFile, video2frames and txt2bin (docs/data.md)."""
import builtins
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basic.bigfile import BigFile, BigFileWriter, write_bigfile
from basic.errors import DataError
from basic.video2frames import (load_video2frames, main as v2f_main, read_video2frames, video2frames_from_ids,
                                write_video2frames)
from util.txt2bin import main as txt2bin_main, txt2bin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def feats():
    names = ['vidA_1', 'vid_B_2', 'vid_B_10', 'vidA_0', 'caf\xe9_3']      # Latin-1 id on purpose
    data = np.arange(len(names) * 3, dtype=np.float32).reshape(len(names), 3) / 7
    return names, data


@pytest.fixture
def bigdir(tmp_path, feats):
    d = tmp_path / 'feat'
    write_bigfile(str(d), *feats)
    return d


# ============ BigFile ============

def test_round_trip_and_request_order(bigdir, feats):
    names, data = feats
    bf = BigFile(str(bigdir))
    assert (bf.nrows, bf.ndims) == (5, 3) and bf.names == names and len(bf) == 5
    assert bf.name2index['caf\xe9_3'] == 4 and 'vidA_0' in bf and 'nope' not in bf
    assert (bigdir / 'shape.txt').read_text() == '5 3'
    assert (bigdir / 'feature.bin').stat().st_size == 5 * 3 * 4
    # request order, repeats kept (the reference returned sorted, de-duplicated rows)
    out = bf.read(['vidA_0', 'vidA_1', 'vidA_0', 'caf\xe9_3'])
    assert out.dtype == np.float32 and out.shape == (4, 3)
    np.testing.assert_array_equal(out, data[[3, 0, 3, 4]])
    np.testing.assert_array_equal(bf.read_one('vid_B_10'), data[2])
    assert bf.read([]).shape == (0, 3)


def test_no_leftover_temporary_files(bigdir):
    assert sorted(os.listdir(bigdir)) == ['feature.bin', 'id.txt', 'shape.txt']


def test_memmap_no_file_open_per_row(bigdir, feats, monkeypatch):
    bf = BigFile(str(bigdir))
    assert isinstance(bf.data, np.memmap)

    def refuse(*args, **kwargs):
        raise AssertionError('a file was opened during a read')
    monkeypatch.setattr(builtins, 'open', refuse)
    monkeypatch.setattr(io, 'open', refuse)
    monkeypatch.setattr(os, 'open', refuse)
    for name, row in zip(feats[0], feats[1]):
        np.testing.assert_array_equal(bf.read_one(name), row)
    np.testing.assert_array_equal(bf.read(feats[0][::-1]), feats[1][::-1])


def test_unknown_ids_name_id_and_folder(bigdir):
    bf = BigFile(str(bigdir))
    with pytest.raises(DataError) as e:
        bf.read(['vidA_0', 'ghost_1', 'ghost_2'])
    msg = str(e.value)
    assert str(bigdir) in msg and 'ghost_1' in msg and 'ghost_2' in msg and '2 unknown' in msg and '\n' not in msg
    with pytest.raises(DataError, match='ghost_9'):
        bf.read_one('ghost_9')


def test_missing_and_bad_shape(bigdir):
    (bigdir / 'shape.txt').write_text('five 3')
    with pytest.raises(DataError, match=r'shape\.txt:1: expected "<rows> <dims>"'):
        BigFile(str(bigdir))
    (bigdir / 'shape.txt').write_text('5')
    with pytest.raises(DataError, match=r'shape\.txt:1'):
        BigFile(str(bigdir))
    (bigdir / 'shape.txt').unlink()
    with pytest.raises(DataError, match=r'shape\.txt: missing'):
        BigFile(str(bigdir))


def test_id_count_mismatch(bigdir):
    (bigdir / 'id.txt').write_text('a_1 b_2 c_3 d_4')
    with pytest.raises(DataError) as e:
        BigFile(str(bigdir))
    assert 'id.txt: 4 ids' in str(e.value) and '5 rows' in str(e.value)


def test_truncated_feature_bin(bigdir):
    raw = (bigdir / 'feature.bin').read_bytes()
    (bigdir / 'feature.bin').write_bytes(raw[:-6])
    with pytest.raises(DataError) as e:
        BigFile(str(bigdir))
    msg = str(e.value)
    assert 'feature.bin' in msg and '54 bytes' in msg and 'expected 60' in msg and 'truncated download?' in msg


def test_duplicate_ids(bigdir):
    # whitespace of any kind separates ids (docs/data.md, 'BigFile')
    (bigdir / 'id.txt').write_text('a_1\nb_2  a_1\tc_3 b_2')
    with pytest.raises(DataError) as e:
        BigFile(str(bigdir))
    assert 'id.txt: 2 duplicate ids (first: a_1, b_2)' in str(e.value)


def test_writer_refuses_bad_ids_and_keeps_folder_clean(tmp_path):
    d = tmp_path / 'w'
    with pytest.raises(ValueError, match='whitespace'):
        write_bigfile(str(d), ['a 1', 'b_2'], np.zeros((2, 2)))
    with pytest.raises(ValueError, match='duplicate'):
        write_bigfile(str(d), ['a_1', 'a_1'], np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r'\(len\(names\), dims\)'):
        write_bigfile(str(d), ['a_1'], np.zeros((2, 2)))
    assert os.listdir(d) == []          # nothing half-written, no temporary files


def test_writer_blocks_equal_one_write(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 4))
    names = [f'v_{i}' for i in range(7)]
    with BigFileWriter(str(tmp_path / 'blocks')) as w:
        w.add_rows(names[:3], data[:3])
        w.add_rows(names[3:], data[3:])
    bf = BigFile(str(tmp_path / 'blocks'))
    np.testing.assert_array_equal(bf.read(names), data.astype(np.float32))


# ============ video2frames ============

def test_video2frames_from_ids_last_underscore_numeric_sort():
    ids = ['oX90Q352-D0_000019_000029_10', 'oX90Q352-D0_000019_000029_2', 'b_x_007', 'b_x_3',
           'oX90Q352-D0_000019_000029_0']
    v2f = video2frames_from_ids(ids)
    assert list(v2f) == ['oX90Q352-D0_000019_000029', 'b_x']            # first-appearance order
    assert v2f['oX90Q352-D0_000019_000029'] == ['oX90Q352-D0_000019_000029_0', 'oX90Q352-D0_000019_000029_2',
                                                 'oX90Q352-D0_000019_000029_10']
    assert v2f['b_x'] == ['b_x_3', 'b_x_007']                            # int order, padding kept


@pytest.mark.parametrize('bad', ['noUnderscore', 'vid_', 'vid_1a', '_5', 'vid_\u0663'])
def test_video2frames_from_ids_rejects(bad):
    with pytest.raises(DataError) as e:
        video2frames_from_ids(['ok_1', bad], source='some/id.txt')
    assert str(e.value).startswith('some/id.txt: ') and repr(bad) in str(e.value)


def test_video2frames_write_read_round_trip(tmp_path):
    mapping = {'v_2': ['v_2_1', 'v_2_0'], 'a\xe9': ['a\xe9_5'], 'v_1': []}
    path = tmp_path / 'video2frames.txt'
    write_video2frames(str(path), mapping)
    assert read_video2frames(str(path)) == mapping
    text = path.read_text(encoding='ascii')
    assert text.index('"a\\u00e9"') < text.index('"v_1"') < text.index('"v_2"')     # sorted, deterministic
    import ast
    assert ast.literal_eval(text) == mapping            # what the reference's eval reads


def test_video2frames_reads_reference_single_quotes(tmp_path):
    path = tmp_path / 'video2frames.txt'
    path.write_text("{'v1': ['v1_0', 'v1_1'], 'v2': ['v2_3']}")
    assert read_video2frames(str(path)) == {'v1': ['v1_0', 'v1_1'], 'v2': ['v2_3']}


def test_video2frames_malicious_file_not_executed(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'video2frames.txt'
    path.write_text(f"__import__('os').system('touch {marker}')")
    with pytest.raises(DataError) as e:
        read_video2frames(str(path))
    assert str(path) in str(e.value)
    assert not marker.exists()
    path.write_text(f"{{'v': [__import__('os').system('touch {marker}')]}}")
    with pytest.raises(DataError):
        read_video2frames(str(path))
    assert not marker.exists()


@pytest.mark.parametrize('text', ['["v_1"]', '{"v": "v_1"}', '{"v": [1, 2]}', '{1: ["v_1"]}', '{"v": ["v_1"]',
                                  ''])
def test_video2frames_wrong_structure(tmp_path, text):
    path = tmp_path / 'video2frames.txt'
    path.write_text(text)
    with pytest.raises(DataError, match=str(path).replace('\\', '\\\\')):
        read_video2frames(str(path))


def test_load_video2frames_prefers_file_else_derives(bigdir):
    derived = load_video2frames(str(bigdir))
    assert derived == {'vidA': ['vidA_0', 'vidA_1'], 'vid_B': ['vid_B_2', 'vid_B_10'], 'caf\xe9': ['caf\xe9_3']}
    assert load_video2frames(str(bigdir), ['x_1', 'x_0']) == {'x': ['x_0', 'x_1']}
    write_video2frames(str(bigdir / 'video2frames.txt'), {'only': ['vidA_1']})
    assert load_video2frames(str(bigdir), ['x_1']) == {'only': ['vidA_1']}


def test_video2frames_cli(bigdir, capsys):
    assert v2f_main([str(bigdir)]) == 0
    written = read_video2frames(str(bigdir / 'video2frames.txt'))
    assert written == video2frames_from_ids(BigFile(str(bigdir)).names)
    assert '3 videos, 5 frames' in capsys.readouterr().out
    # as a module, from the repo root
    run = subprocess.run([sys.executable, '-m', 'basic.video2frames', str(bigdir), '--overwrite'], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ============ txt2bin ============

def test_txt2bin_duplicates_nan_and_streaming(tmp_path, monkeypatch):
    import util.txt2bin as t2b
    monkeypatch.setattr(t2b, 'BLOCK', 2)             # several blocks
    a = tmp_path / 'a.txt'
    b = tmp_path / 'b.txt'
    a.write_bytes(b'v_1 1 2 3\r\n\nv_2 nan 0 0\nv_3 -1.5 2e2 0\nv_1 9 9 9\n')
    b.write_bytes(b'v_2 4 4 4\ncaf\xe9_1 0.25 0.5 1\nv_4 7 8 9')
    stats = txt2bin([str(a), str(b)], str(tmp_path / 'out'))
    # v_2's first line (NaN) decides: its later clean line is a duplicate, as in the reference
    assert stats == {'rows': 4, 'ndims': 3, 'duplicates': 2, 'nan_rows': 1}
    bf = BigFile(str(tmp_path / 'out'))
    assert bf.names == ['v_1', 'v_3', 'caf\xe9_1', 'v_4']
    np.testing.assert_array_equal(bf.read(bf.names), [[1, 2, 3], [-1.5, 200, 0], [0.25, 0.5, 1], [7, 8, 9]])


def test_txt2bin_wrong_width_names_file_and_line(tmp_path):
    a = tmp_path / 'a.txt'
    a.write_text('v_1 1 2 3\nv_2 1 2\n')
    with pytest.raises(DataError) as e:
        txt2bin([str(a)], str(tmp_path / 'out'))
    assert str(e.value).startswith(f'{a}:2: 2 values') and 'expected 3' in str(e.value)
    a.write_text('v_1 1 2 3\nv_2 1 x 3\n')
    with pytest.raises(DataError, match=r'a\.txt:2: .*not a number'):
        txt2bin([str(a)], str(tmp_path / 'out'))
    with pytest.raises(DataError, match=r'a\.txt:1: 3 values .*expected 4'):
        txt2bin([str(a)], str(tmp_path / 'out'), ndims=4)
    assert not (tmp_path / 'out' / 'feature.bin').exists()


def test_txt2bin_cli(tmp_path, capsys):
    a = tmp_path / 'a.txt'
    a.write_text('v_1 1 2\nv_1 3 4\n')
    out = tmp_path / 'out'
    assert txt2bin_main(['--output', str(out), str(a)]) == 0
    assert '1 rows x 2 dims' in capsys.readouterr().out
    assert txt2bin_main(['--output', str(out), str(a)]) == 1          # refuses to overwrite
    assert txt2bin_main(['--output', str(out), '--overwrite', str(tmp_path / 'none.txt')]) == 1
    assert 'none.txt' in capsys.readouterr().err
    run = subprocess.run([sys.executable, 'util/txt2bin.py', '--output', str(out), '--overwrite', str(a)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
