"""Corrupt or empty inputs end in one line naming the file (issue #11, items 4 and 5):
NaN / Inf in feature.bin (BigFile, DataLoader workers, format_check, trainer, tester) and caption files
that are empty or pair to nothing."""
import io
import os
import shutil

import numpy as np
import pytest

from basic.bigfile import BigFile, write_bigfile
from basic.captions import read_captions
from basic.errors import DataError
from conftest import tiny_train_argv
from basic import data_provider as dp

FEATURE = 'toy_feature'


def one_line(message):
    assert '\n' not in message, message
    return message


# ============ NaN / Inf in feature.bin: the reader ============

@pytest.fixture
def bad_bigfile(tmp_path):
    names = [f'v{i // 3}_{i % 3}' for i in range(9)]
    x = np.arange(9 * 4, dtype=np.float32).reshape(9, 4)
    x[4, 1] = np.nan
    x[7, 3] = np.inf
    write_bigfile(str(tmp_path / 'feat'), names, x)
    return str(tmp_path / 'feat'), names, x


def test_read_names_feature_bin_row_and_frame(bad_bigfile):
    path, names, x = bad_bigfile
    bf = BigFile(path)
    assert np.array_equal(bf.read(['v0_2', 'v2_0', 'v0_0']), x[[2, 6, 0]])      # clean rows read as before
    with pytest.raises(DataError) as e:
        bf.read(['v0_0', 'v2_1', 'v1_1'])           # request order: the Inf row comes first
    msg = one_line(str(e.value))
    assert os.path.join(path, 'feature.bin') in msg and 'row 7' in msg and 'v2_1' in msg
    with pytest.raises(DataError, match=r'row 4 \(frame id v1_1\)'):
        bf.read_one('v1_1')
    assert np.array_equal(bf.read_one('v1_0'), x[3])


def test_frame_store_error_crosses_dataloader_workers(bad_bigfile):
    """A worker process's DataError reaches the main process as the same single line."""
    path, _, _ = bad_bigfile
    store = dp.FrameStore(path)
    loader = dp.make_loader(dp.VideoDataset(['v0', 'v1', 'v2'], store), batch_size=1, workers=1)
    with pytest.raises(DataError) as e:
        for _ in loader:
            pass
    msg = one_line(str(e.value))
    assert msg.startswith(os.path.join(path, 'feature.bin')) and 'v1_1' in msg


def test_nonfinite_rows_scans_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((53, 5)).astype(np.float32)
    bad = [0, 17, 18, 40, 52]
    for r, value in zip(bad, (np.nan, np.inf, -np.inf, np.nan, np.nan)):
        x[r, r % 5] = value
    write_bigfile(str(tmp_path / 'f'), [f'v_{i}' for i in range(53)], x)
    bf = BigFile(str(tmp_path / 'f'))
    for chunk_bytes in (1, 4 * 5 * 7, 4 * 5 * 18, 1 << 20):       # 1 row, 7 rows, 18 rows, all at once
        assert bf.nonfinite_rows(chunk_bytes=chunk_bytes) == bad


# ============ NaN in a collection: format_check, trainer, tester ============

@pytest.fixture
def collection(toy_root, tmp_path):
    """A private copy of the toy collection (the session's toy_root is shared, so never damage it)."""
    root = tmp_path / 'VS'
    shutil.copytree(os.path.join(toy_root, 'toy'), root / 'toy')
    return str(root)


def argv_for(collection, toy_root, tag, *extra):
    argv = tiny_train_argv(collection, tag, *extra)
    argv[argv.index('--bert_name') + 1] = os.path.join(toy_root, 'tiny_bert')
    return argv


def poison_frame(root, video_id, frame=1):
    """Put a NaN into one frame of `video_id`; returns (row, frame id)."""
    fdir = os.path.join(root, 'toy', 'FeatureData', FEATURE)
    store = dp.FrameStore(fdir)
    frame_id = store.video2frames[video_id][frame]
    row = store.bigfile.name2index[frame_id]
    data = np.memmap(os.path.join(fdir, 'feature.bin'), dtype='<f4', mode='r+',
                     shape=(store.bigfile.nrows, store.bigfile.ndims))
    data[row, 3] = np.nan
    data.flush()
    del data
    return row, frame_id


def first_video(root, split_file):
    return read_captions(os.path.join(root, 'toy', 'TextData', split_file)).video_ids[0]


def test_format_check_reports_the_nan_frame(collection):
    from util import format_check
    out = io.StringIO()
    assert format_check.main(['--rootpath', collection, '--collection', 'toy', '--preset', 'toy'], out=out) == 0
    assert 'OK       feature values' in out.getvalue()
    row, frame_id = poison_frame(collection, first_video(collection, 'toytrain.caption.txt'))
    out = io.StringIO()
    assert format_check.main(['--rootpath', collection, '--collection', 'toy', '--preset', 'toy'], out=out) == 1
    bad = [line for line in out.getvalue().splitlines() if line.startswith('BAD')]
    assert len(bad) == 1 and 'feature.bin' in bad[0] and f'{frame_id} (row {row})' in bad[0] and '1 rows' in bad[0]


def test_trainer_and_tester_stop_at_the_nan_frame(collection, toy_root, tmp_path):
    import tester
    import trainer
    # a checkpoint from clean features (untrained: --num_epochs 0), to test on the damaged ones below
    run = trainer.main(argv_for(collection, toy_root, 'clean', '--num_epochs', '0', '--skip_test', '1'))
    row, frame_id = poison_frame(collection, first_video(collection, 'toytrain.caption.txt'))
    expected = f'{os.path.join(collection, "toy", "FeatureData", FEATURE, "feature.bin")}: row {row} ' \
               f'(frame id {frame_id}) holds NaN'
    with pytest.raises(SystemExit) as e:
        trainer.main(argv_for(collection, toy_root, 'nan', '--num_epochs', '1', '--skip_test', '1'))
    assert expected in one_line(str(e.value))

    row, frame_id = poison_frame(collection, first_video(collection, 'toytest_zh.caption.txt'))
    expected = f'row {row} (frame id {frame_id}) holds NaN'
    with pytest.raises(SystemExit) as e:
        tester.main(['--rootpath', collection, '--logger_name', run['run_dir'], '--device', 'cpu',
                     '--workers', '0', '--results_dir', str(tmp_path / 'results')])
    assert 'feature.bin' in one_line(str(e.value)) and expected in str(e.value)


# ============ empty caption files ============

def test_empty_caption_file_is_named(tmp_path):
    for content in (b'', b'\n\r\n  \n', b'\xef\xbb\xbf'):
        path = tmp_path / 'x.caption.txt'
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            read_captions(str(path))
        assert str(path) in one_line(str(e.value)) and 'no captions' in str(e.value)


def test_trainer_names_an_empty_training_caption_file(collection, toy_root):
    import trainer
    empty = os.path.join(collection, 'toy', 'TextData', 'toytrain_google_enc2zh.caption.txt')
    open(empty, 'w').close()
    with pytest.raises(SystemExit) as e:
        trainer.main(argv_for(collection, toy_root, 'x', '--num_epochs', '1', '--skip_test', '1'))
    assert empty in one_line(str(e.value)) and 'no captions' in str(e.value)


def test_trainer_names_caption_files_that_pair_to_nothing(collection, toy_root):
    """The MT file holds captions, but of other videos: zero pairs, not num_samples=0."""
    import trainer
    text = os.path.join(collection, 'toy', 'TextData')
    mt = os.path.join(text, 'toytrain_google_enc2zh.caption.txt')
    with open(mt, 'w', encoding='utf-8') as f:
        f.write('otherVideo#enc2zh#0 一个人\notherVideo#enc2zh#1 两个人\n')
    with pytest.raises(SystemExit) as e:
        trainer.main(argv_for(collection, toy_root, 'x', '--num_epochs', '1', '--skip_test', '1'))
    msg = one_line(str(e.value))
    assert os.path.join(text, 'toytrain.caption.txt') in msg and mt in msg and 'none of its' in msg


def test_tester_names_an_empty_test_caption_file(collection, toy_root, tmp_path):
    import tester
    import trainer
    run = trainer.main(argv_for(collection, toy_root, 'clean', '--num_epochs', '0', '--skip_test', '1'))
    empty = os.path.join(collection, 'toy', 'TextData', 'toytest_zh.caption.txt')
    with open(empty, 'w') as f:
        f.write('\n')
    with pytest.raises(SystemExit) as e:
        tester.main(['--rootpath', collection, '--logger_name', run['run_dir'], '--device', 'cpu',
                     '--workers', '0', '--results_dir', str(tmp_path / 'results')])
    assert empty in one_line(str(e.value))


def test_derived_half_split_without_captions_is_named(toy_root, tmp_path):
    """English captions only of video a, Chinese only of video b, and the split gives a to Chinese."""
    text = tmp_path / 'toy' / 'TextData'
    text.mkdir(parents=True)
    (text / 'toytrain.caption.txt').write_text('a#enc#0 a man\n', encoding='utf-8')
    (text / 'toytrain_zh.caption.txt').write_text('b#zh#0 一个人\n', encoding='utf-8')
    seed = next(s for s in range(100) if np.random.default_rng(s).permutation(2)[0] == 1)   # English half = {b}
    tokenizer = dp.build_tokenizer(os.path.join(toy_root, 'tiny_bert'), True)
    with pytest.raises(DataError) as e:
        dp.derive_half_table(str(tmp_path), 'toy', tokenizer, seed=seed)
    assert str(text / 'toytrain.caption.txt') in one_line(str(e.value)) and 'train_half' in str(e.value)
    other = next(s for s in range(100) if np.random.default_rng(s).permutation(2)[0] == 0)
    assert len(dp.derive_half_table(str(tmp_path), 'toy', tokenizer, seed=other)) == 2


# ============ one copy of each one-line error (issue #17, item 4) ============

def cli(script, *argv):
    """(return code, stdout + stderr) of `python script argv...` as a user runs it."""
    import subprocess
    import sys
    from conftest import REPO
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    return proc.returncode, proc.stdout + proc.stderr


def test_trainer_error_is_printed_once_and_writes_nothing(collection, toy_root):
    import trainer
    from basic import runs
    empty = os.path.join(collection, 'toy', 'TextData', 'toytrain_google_enc2zh.caption.txt')
    open(empty, 'w').close()
    argv = argv_for(collection, toy_root, 'once', '--num_epochs', '1', '--skip_test', '1')
    code, out = cli('trainer.py', *argv)
    assert code == 1 and out.count(f'{empty}: no captions') == 1 and f'error: {empty}: no captions' in out
    assert not os.path.exists(runs.run_dir(trainer.parse_args(argv)))    # every input read before the folder


def test_tester_error_is_printed_once(collection, toy_root, tmp_path):
    import trainer
    run = trainer.main(argv_for(collection, toy_root, 'clean', '--num_epochs', '0', '--skip_test', '1'))
    common = ['--rootpath', collection, '--logger_name', run['run_dir'], '--device', 'cpu', '--workers', '0']
    code, out = cli('tester.py', *common, '--checkpoint_name', 'missing.pth.tar')
    assert code == 1 and out.count('missing.pth.tar: checkpoint not found') == 1
    # found while encoding, with test.log open: once on the terminal, once in the log
    row, frame_id = poison_frame(collection, first_video(collection, 'toytest_zh.caption.txt'))
    results = tmp_path / 'results'
    code, out = cli('tester.py', *common, '--results_dir', str(results))
    expected = f'row {row} (frame id {frame_id}) holds NaN'
    assert code == 1 and out.count(expected) == 1
    assert (results / 'test.log').read_text().count(expected) == 1


@pytest.mark.parametrize('flags,expected', [
    (['-q', 'a dog', '-k', '0'], '-k 0: the number of results per query must be at least 1'),
    (['-q', 'a dog', '--weight', '-0.5'], '--weight -0.5: the fusion weight on the English text must be in [0, 1]'),
    (['-q', '  '], '--query number 1 is empty'),
    (['-q', 'a dog'], 'no_such_run: no such checkpoint file or run folder'),
])
def test_search_stops_with_one_line(tmp_path, flags, expected):
    code, out = cli('search.py', '--checkpoint', str(tmp_path / 'no_such_run'), '--device', 'cpu', *flags)
    assert code == 1 and out.strip().count('\n') == 0 and out.startswith('error: ') and expected in out, out


def test_search_queries_file_without_a_query_is_named(tmp_path):
    import search
    parser = search.get_args_parser()
    for content, expected in (('a dog\n\tonly english\n', ':2: the query before the tab is empty'),
                              ('\n  \n', 'no queries')):
        path = tmp_path / 'q.txt'
        path.write_text(content, encoding='utf-8')
        with pytest.raises(DataError) as e:
            search.read_queries(parser.parse_args(['--checkpoint', 'x', '--queries_file', str(path)]))
        assert one_line(str(e.value)).startswith(str(path)) and expected in str(e.value)
