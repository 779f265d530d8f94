"""Caption ids, caption files, English cleaning and pairing (docs/data.md)."""
import logging
from pathlib import Path

import pytest

from basic.captions import (CaptionFile, clean_english, match_captions, pair_captions, parse_cap_id, read_captions,
                            video_order)
from basic.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode('utf-8'))
    return str(path)


# ============ ids ============

def test_parse_cap_id():
    assert parse_cap_id('oX90Q352-D0_000019_000029#enc#7') == ('oX90Q352-D0_000019_000029', 'enc', 7)
    assert parse_cap_id('video9770.mp4#zhc2en#0') == ('video9770', 'zhc2en', 0)
    assert parse_cap_id('img_12.jpg#zh#10') == ('img_12', 'zh', 10)
    assert parse_cap_id('a.jpg.mp4#zh#1') == ('a.jpg', 'zh', 1)          # only the last extension


@pytest.mark.parametrize('bad', ['vid#enc', 'vid#enc#1#2', 'vid', 'vid#enc#x', 'vid#enc#', '#enc#1', 'vid##1',
                                 'vid#enc#-1', 'vid#enc#\u0663'])
def test_parse_cap_id_rejects(bad):
    with pytest.raises(ValueError, match='expected'):
        parse_cap_id(bad)


# ============ reading ============

def test_read_captions_tolerates_crlf_bom_blank_lines_no_final_newline(tmp_path):
    path = write(tmp_path / 'c.txt', b'\xef\xbb\xbfv1#enc#0 a man   runs \r\n\r\n'
                                     b'  v_2.mp4#enc#1 \xe4\xbd\xa0\xe5\xa5\xbd  x\r\n'
                                     b'v1#enc#1 two words: one\xe2\x80\xa8two\n\n   \nv1#zh#2 last')
    cf = read_captions(path)
    assert cf.path == path and len(cf) == 4
    assert cf.cap_ids == ['v1#enc#0', 'v_2.mp4#enc#1', 'v1#enc#1', 'v1#zh#2']
    # first space splits; inner runs kept; the line is stripped (trailing space and \r gone)
    assert cf.texts == ['a man   runs', '\u4f60\u597d  x', 'two words: one\u2028two', 'last']
    assert cf.video_ids == ['v1', 'v_2', 'v1', 'v1']
    assert cf.tags == ['enc', 'enc', 'enc', 'zh'] and cf.ks == [0, 1, 1, 2]
    assert cf.line_nos == [1, 3, 4, 7]


def test_read_captions_keeps_extra_space_after_id(tmp_path):
    # the reference splits at the FIRST space: "id  text" keeps one leading space in the text
    cf = read_captions(write(tmp_path / 'c.txt', 'v#enc#0  two spaces\n'))
    assert cf.texts == [' two spaces']


@pytest.mark.parametrize('content, line, expect', [
    ('v#enc#0 ok\n\nv#enc#1\n', 3, 'has no text'),
    ('v#enc#0 ok\nv#enc#1   \r\n', 2, 'has no text'),
    ('v#enc#0 ok\nv#enc some text\n', 2, 'expected 3'),
    ('v#enc#0 ok\nv#enc#one some text\n', 2, 'integer k'),
    ('v#enc#0 ok\nv#enc#1#2 some text\n', 2, 'expected 3'),
    ('just text without an id\n', 1, 'expected 3'),
])
def test_read_captions_bad_lines_name_file_and_line(tmp_path, content, line, expect):
    path = write(tmp_path / 'bad.caption.txt', content)
    with pytest.raises(DataError) as e:
        read_captions(path)
    msg = str(e.value)
    assert msg.startswith(f'{path}:{line}: ') and expect in msg and '\n' not in msg


def test_read_captions_invalid_utf8_names_line(tmp_path):
    path = write(tmp_path / 'latin.txt', b'v#enc#0 fine\nv#enc#1 caf\xe9\n')
    with pytest.raises(DataError, match=r'latin\.txt:2: invalid UTF-8'):
        read_captions(path)
    path = write(tmp_path / 'bom.txt', b'\xef\xbb\xbfv#enc#0 fine\r\nv#enc#1 ok\r\nv#enc#2 \xff\r\n')
    with pytest.raises(DataError, match=r'bom\.txt:3: invalid UTF-8 at byte 37;'):
        read_captions(path)


def test_read_captions_duplicate_names_both_lines(tmp_path):
    # same (video, k) under another tag and with an extension is still the same caption slot
    path = write(tmp_path / 'dup.txt', 'v#enc#0 a\nw#enc#0 b\n\nv.mp4#zh#0 c\n')
    with pytest.raises(DataError) as e:
        read_captions(path)
    assert str(e.value).startswith(f'{path}:4: ') and 'line 1' in str(e.value)


def test_read_captions_missing_file(tmp_path):
    with pytest.raises(DataError, match='nope.caption.txt'):
        read_captions(str(tmp_path / 'nope.caption.txt'))


# ============ cleaning, order ============

@pytest.mark.parametrize('raw, clean', [
    ("A man's Caf\u00e9, doing push   ups!", 'A man s caf doing push ups.'),
    ('.', ''),
    ('', ''),
    ('  \u4f60\u597d  ', ''),
    ('What?', 'What.'),
    ('3 DOGS\tRUN', '3 dogs run.'),
    ('x', 'X.'),
])
def test_clean_english(raw, clean):
    assert clean_english(raw) == clean


def test_video_order():
    assert video_order(['b', 'a', 'b', 'c', 'a']) == ['b', 'a', 'c']
    assert video_order([]) == []


# ============ pairing ============

def caption_file(path, rows):
    """CaptionFile from (video_id, tag, k) rows, texts 'video/k'."""
    cf = CaptionFile(path)
    for n, (v, tag, k) in enumerate(rows, start=1):
        cf.append(f'{v}#{tag}#{k}', f'{v}/{k}', v, tag, k, n)
    return cf


def test_pair_by_video_and_k_both_mt_namings(caplog):
    primary = caption_file('p', [('a', 'zh2enc', 0), ('a', 'zh2enc', 1), ('b', 'zh2enc', 0)])
    partner_a = caption_file('q', [('b', 'zhc2en', 0), ('a', 'zhc2en', 1), ('a', 'zhc2en', 0)])
    partner_b = caption_file('r', [('a', 'zh', 1), ('b', 'zh', 0), ('a', 'zh', 0)])
    with caplog.at_level(logging.WARNING):
        keep, rows = pair_captions(primary, [partner_a, partner_b])
    assert keep == [0, 1, 2] and rows == [[2, 1, 0], [2, 0, 1]]
    assert not caplog.records
    for j, partner in enumerate((partner_a, partner_b)):
        assert [partner.texts[r] for r in rows[j]] == [primary.texts[i] for i in keep]


def test_pair_missing_partner_one_warning_or_strict_error(caplog):
    primary = caption_file('prim.txt', [('a', 'enc', 0), ('a', 'enc', 1), ('b', 'enc', 0), ('c', 'enc', 0)])
    tr = caption_file('tr.txt', [('a', 'enc2zh', 0), ('c', 'enc2zh', 0), ('a', 'enc2zh', 1)])
    bt = caption_file('bt.txt', [('a', 'enc2zh2enc', 0), ('b', 'enc2zh2enc', 0), ('a', 'enc2zh2enc', 1),
                                 ('z', 'enc2zh2enc', 0)])
    with caplog.at_level(logging.WARNING):
        keep, rows = pair_captions(primary, [tr, bt])
    assert keep == [0, 1] and rows == [[0, 2], [0, 2]]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert 'prim.txt: 2 of 4 captions' in msg and '1 not in tr.txt (first: b#enc#0)' in msg
    assert '1 not in bt.txt (first: c#enc#0)' in msg
    with pytest.raises(DataError, match='2 of 4 captions.*--strict'):
        pair_captions(primary, [tr, bt], strict=True)
    assert match_captions(primary, [tr, bt])[2] == [[2], [3]]


def test_pair_without_partners_keeps_all():
    primary = caption_file('p', [('a', 'half', 0), ('b', 'zh', 0)])
    assert pair_captions(primary, []) == ([0, 1], [])


# ============ the real samples (../shared/data) ============

def sample(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f'real caption samples not found at {SHARED_DATA} (they live beside the repo, never in it)')
    return read_captions(str(path))


def test_sample_quirks_read_cleanly():
    en = sample('vatex_sample/vatexval.caption.txt')
    zh = sample('vatex_sample/vatexval_zh.caption.txt')                  # no final newline
    enc2zh = sample('vatex_sample/vatexval_google_enc2zh.caption.txt')   # CRLF
    # README: 40 validation videos x 10 captions in each file
    for cf in (en, zh, enc2zh):
        assert len(cf) == 400 and len(set(cf.video_ids)) == 40
        assert not any('\r' in t or t != t.strip() for t in cf.texts)
    assert zh.cap_ids[-1].startswith('IjaA8hal1xM_000034_000044#zh#9')     # last line, no newline after it
    i = en.cap_ids.index('3c0hLqxvSSI_000000_000010#enc#1')
    assert en.texts[i] == 'a man is doing push   ups in a gym using a support block'
    assert en.video_ids[i] == '3c0hLqxvSSI_000000_000010' and en.ks[i] == 1
    assert video_order(zh.video_ids) != video_order(en.video_ids)       # files of one split differ in order
    assert set(zh.video_ids) == set(en.video_ids)


def test_sample_pairing_by_video_and_k():
    en = sample('vatex_sample/vatextest.caption.txt')
    enc2zh = sample('vatex_sample/vatextest_google_enc2zh.caption.txt')
    zh = sample('vatex_sample/vatextest_zh.caption.txt')
    zhc2en = sample('vatex_sample/vatextest_google_zhc2en.caption.txt')
    keep, rows = pair_captions(en, [enc2zh, zh, zhc2en], strict=True)
    assert keep == list(range(410))
    for j, partner in enumerate((enc2zh, zh, zhc2en)):
        assert [(partner.video_ids[r], partner.ks[r]) for r in rows[j]] == list(zip(en.video_ids, en.ks))
    # by hand: line 4 of the English file is sf2PPeXQrUA_000000_000010#enc#3
    i = en.cap_ids.index('sf2PPeXQrUA_000000_000010#enc#3')
    assert en.line_nos[i] == 4
    assert enc2zh.texts[rows[0][i]] == '\u4e00\u7fa4\u513f\u7ae5\u548c\u9752\u5c11\u5e74\u53d1\u6325\u4e86\u4e00' \
                                      '\u573a\u8e22\u7403\u6e38\u620f'
    assert zh.line_nos[rows[1][i]] == 224 and zh.cap_ids[rows[1][i]] == 'sf2PPeXQrUA_000000_000010#zh#3'
    assert zhc2en.texts[rows[2][i]] == 'There is a man in dark clothes playing football.'


def test_sample_msrvtt_one_caption_per_video():
    files = [sample(f'msrvtt_sample/msrvtt10kyutest{s}.caption.txt')
             for s in ('_google_zhc2en', '_zh', '', '_google_enc2zh')]
    keep, rows = pair_captions(files[0], files[1:], strict=True)
    assert len(keep) == 1000 and set(files[0].ks) == {0}
    assert len(video_order(files[0].video_ids)) == 1000
    i = files[0].cap_ids.index('video9770#zhc2en#0')
    assert files[2].texts[rows[1][i]] == 'a person is connecting something to system'
    assert clean_english(files[0].texts[i]) == 'A person is connecting something to the system.'
