"""util/import_features.py: every input format round-trips exactly; bad files are named and skipped (or fatal)."""
import os
import pickle

import numpy as np
import pytest

from basic.bigfile import BigFile
from basic.errors import DataError
from basic.video2frames import read_video2frames
from util.import_features import import_features, main


def _arrays(seed=0, dims=6):
    """Videos of 1..5 frames and one (dims,) vector; ids with underscores and digits."""
    rng = np.random.default_rng(seed)
    arrays = {f'vid_{i:02d}': rng.standard_normal((1 + i % 5, dims)).astype(np.float32) for i in range(7)}
    arrays['single'] = rng.standard_normal(dims).astype(np.float64)     # (dims,) and float64
    return arrays


def _check_round_trip(out, arrays):
    bf = BigFile(out)
    v2f = read_video2frames(os.path.join(out, 'video2frames.txt'))
    assert sorted(v2f) == sorted(arrays)
    for vid, arr in arrays.items():
        expected = np.atleast_2d(arr).astype(np.float32)
        assert v2f[vid] == [f'{vid}_{i}' for i in range(len(expected))]
        np.testing.assert_array_equal(bf.read(v2f[vid]), expected)
    assert bf.nrows == sum(len(np.atleast_2d(a)) for a in arrays.values())


def test_npy_folder_round_trip_with_feature_suffix(tmp_path):
    arrays = _arrays()
    src = tmp_path / 'src'
    src.mkdir()
    for vid, arr in arrays.items():
        np.save(src / f'{vid}_i3d.npy', arr)
    report = import_features(str(src), str(tmp_path / 'out'), progress=False, log=lambda *_: None)
    assert report.videos == len(arrays) and not report.bad and report.dims == 6
    _check_round_trip(str(tmp_path / 'out'), arrays)


def test_npy_folder_without_suffix_keeps_ids(tmp_path):
    # ids vid_00 .. vid_06 end in different digits: nothing is stripped
    arrays = {k: v for k, v in _arrays().items() if k != 'single'}
    src = tmp_path / 'src'
    src.mkdir()
    for vid, arr in arrays.items():
        np.save(src / f'{vid}.npy', arr)
    import_features(str(src), str(tmp_path / 'out'), progress=False, log=lambda *_: None)
    _check_round_trip(str(tmp_path / 'out'), arrays)


def test_npz_file_and_folder_of_npz(tmp_path):
    arrays = _arrays(1)
    np.savez(tmp_path / 'all.npz', **arrays)
    import_features(str(tmp_path / 'all.npz'), str(tmp_path / 'out1'), progress=False)
    _check_round_trip(str(tmp_path / 'out1'), arrays)
    src = tmp_path / 'npz'
    src.mkdir()
    for vid, arr in arrays.items():
        np.savez(src / f'{vid}.npz', features=arr)
    import_features(str(src), str(tmp_path / 'out2'), strip_suffix='none', progress=False)
    _check_round_trip(str(tmp_path / 'out2'), arrays)


def test_hdf5_round_trip(tmp_path):
    h5py = pytest.importorskip('h5py', reason='h5py is optional (requirements-optional.txt)')
    arrays = _arrays(2)
    with h5py.File(tmp_path / 'f.h5', 'w') as f:
        for vid, arr in arrays.items():
            f.create_dataset(vid, data=arr)
    import_features(str(tmp_path / 'f.h5'), str(tmp_path / 'out'), progress=False)
    _check_round_trip(str(tmp_path / 'out'), arrays)


def test_pickle_needs_explicit_permission(tmp_path):
    arrays = _arrays(3)
    with open(tmp_path / 'f.pkl', 'wb') as f:
        pickle.dump(arrays, f)
    with pytest.raises(DataError, match='allow_pickle'):
        import_features(str(tmp_path / 'f.pkl'), str(tmp_path / 'out'), progress=False)
    assert not os.path.exists(tmp_path / 'out' / 'feature.bin')
    import_features(str(tmp_path / 'f.pkl'), str(tmp_path / 'out'), allow_pickle=True, progress=False)
    _check_round_trip(str(tmp_path / 'out'), arrays)


def _folder_with_bad_files(tmp_path):
    arrays = {k: v for k, v in _arrays(4).items() if k != 'single'}
    src = tmp_path / 'src'
    src.mkdir()
    for vid, arr in arrays.items():
        np.save(src / f'{vid}.npy', arr)
    data = (src / 'vid_03.npy').read_bytes()
    (src / 'vid_03.npy').write_bytes(data[:len(data) - 10])          # truncated
    nan = arrays['vid_05'].copy()
    nan[0, 2] = np.nan
    np.save(src / 'vid_05.npy', nan)
    np.save(src / 'wide.npy', np.zeros((2, 7), np.float32))          # wrong dims
    good = {k: v for k, v in arrays.items() if k not in ('vid_03', 'vid_05')}
    return src, good


def test_bad_files_are_named_and_skipped(tmp_path, capsys):
    src, good = _folder_with_bad_files(tmp_path)
    main([str(src), '--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert 'vid_03.npy: unreadable' in err
    assert 'vid_05.npy: 1 non-finite values' in err and 'frame 0, dim 2' in err
    assert 'wide.npy: 7 dims, but the first video has 6' in err
    _check_round_trip(str(tmp_path / 'out'), good)


def test_strict_stops_and_writes_nothing(tmp_path):
    src, _ = _folder_with_bad_files(tmp_path)
    with pytest.raises(SystemExit, match=r'vid_03\.npy: unreadable'):
        main([str(src), '--out', str(tmp_path / 'out'), '--strict', '1'])
    assert not os.path.exists(tmp_path / 'out' / 'feature.bin')
    assert not os.listdir(tmp_path / 'out')                          # temporary files removed too


def test_existing_folder_needs_overwrite(tmp_path):
    arrays = _arrays(5)
    np.savez(tmp_path / 'a.npz', **arrays)
    import_features(str(tmp_path / 'a.npz'), str(tmp_path / 'out'), progress=False)
    with pytest.raises(DataError, match='overwrite'):
        import_features(str(tmp_path / 'a.npz'), str(tmp_path / 'out'), progress=False)
    smaller = dict(list(arrays.items())[:3])
    np.savez(tmp_path / 'b.npz', **smaller)
    import_features(str(tmp_path / 'b.npz'), str(tmp_path / 'out'), overwrite=True, progress=False)
    _check_round_trip(str(tmp_path / 'out'), smaller)
