"""Caption files: reading, ids, English cleaning and pairing (docs/data.md).

A caption line is `<video_id>#<tag>#<k> <text>`. Captions of different files are paired by (video id, k)
parsed from their ids, never by rebuilding an id with another tag, so both MT namings (`zh2enc`, `zhc2en`)
pair and files listing videos in different orders pair correctly.
"""
import logging
import re
from dataclasses import dataclass, field

from basic.errors import DataError

logger = logging.getLogger(__name__)

_SHOW = 5                                  # how many ids a message lists
_NON_ALNUM = re.compile(r'[^A-Za-z0-9]')
_ID_FORMAT = '"<video_id>#<tag>#<k> <caption text>"'


def parse_cap_id(cap_id):
    """`<video_id>#<tag>#<k>` -> (video_id, tag, k). A trailing `.jpg`/`.mp4` is dropped from the video id
    (docs/data.md, 'Caption files'). Raises ValueError unless there are exactly three fields, non-empty, k an int."""
    fields = cap_id.split('#')
    if len(fields) != 3:
        raise ValueError(f'caption id {cap_id!r} has {len(fields)} "#"-separated fields, expected 3 '
                         '("<video_id>#<tag>#<k>")')
    video_id, tag, k = fields
    if not (video_id and tag and k.isascii() and k.isdigit()):
        raise ValueError(f'caption id {cap_id!r}: expected "<video_id>#<tag>#<k>" with non-empty video id '
                         'and tag and an integer k')
    if video_id.endswith(('.jpg', '.mp4')):
        video_id = video_id[:-4]
    return video_id, tag, int(k)


@dataclass
class CaptionFile:
    """One caption file as parallel lists, in file order; `line_nos` are 1-based line numbers."""
    path: str
    cap_ids: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    video_ids: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    ks: list = field(default_factory=list)
    line_nos: list = field(default_factory=list)

    def __len__(self):
        return len(self.cap_ids)

    def append(self, cap_id, text, video_id, tag, k, line_no):
        """Add one caption (keeps the parallel lists aligned)."""
        for column, value in zip((self.cap_ids, self.texts, self.video_ids, self.tags, self.ks, self.line_nos),
                                 (cap_id, text, video_id, tag, k, line_no)):
            column.append(value)


def read_captions(path):
    """Read a caption file (docs/data.md, 'Caption files') into a CaptionFile.

    UTF-8 (a BOM is dropped), CRLF or LF, final newline optional, blank lines skipped. Each stripped line
    is split at its first space; runs of spaces inside the text are kept. Bad lines, invalid UTF-8 and a
    repeated (video id, k) are DataErrors naming `path:line`; a file without any caption is a DataError
    naming `path`."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read caption file ({e.strerror}); '
                        'check --rootpath and --collection') from None
    skip = 3 if data.startswith(b'\xef\xbb\xbf') else 0          # a UTF-8 BOM
    try:
        text = data[skip:].decode('utf-8')
    except UnicodeDecodeError as e:
        line = data.count(b'\n', 0, skip + e.start) + 1
        raise DataError(f'{path}:{line}: invalid UTF-8 at byte {skip + e.start}; re-save the file as UTF-8') from None
    cf = CaptionFile(path)
    first_line = {}                        # (video_id, k) -> line number
    # split on '\n' only: str.splitlines would also break lines at U+2028, U+0085 etc. inside a caption
    for line_no, line in enumerate(text.split('\n'), start=1):
        line = line.strip()
        if not line:
            continue
        cap_id, _, caption = line.partition(' ')
        if not caption:
            raise DataError(f'{path}:{line_no}: caption {cap_id[:80]!r} has no text; expected {_ID_FORMAT}; '
                            'add the text or delete the line')
        try:
            video_id, tag, k = parse_cap_id(cap_id)
        except ValueError as e:
            raise DataError(f'{path}:{line_no}: {e}; each line must be {_ID_FORMAT}') from None
        if (video_id, k) in first_line:
            raise DataError(f'{path}:{line_no}: caption {cap_id!r} repeats video {video_id!r} and k={k} of line '
                            f'{first_line[video_id, k]}; each (video, k) may appear once per file, remove one')
        first_line[video_id, k] = line_no
        cf.append(cap_id, caption, video_id, tag, k, line_no)
    if not cf.cap_ids:
        raise DataError(f'{path}: no captions (the file is empty or blank); expected one {_ID_FORMAT} per line; '
                        'restore the file (an interrupted download or copy?)')
    return cf


def clean_english(text):
    """docs/data.md, 'English cleaning': non-[A-Za-z0-9] -> space, lower-case, collapse spaces, strip, append '.' unless empty or
    ending in . ? ! (never, after step 1), capitalise the first character."""
    text = ' '.join(_NON_ALNUM.sub(' ', text).lower().split())
    if text and text[-1] not in '.?!':
        text += '.'
    return text[:1].upper() + text[1:]


def video_order(video_ids):
    """Distinct video ids in order of first appearance (docs/data.md, 'Caption files'), in O(N)."""
    return list(dict.fromkeys(video_ids))


def match_captions(primary, partners):
    """Match every primary caption to each partner file by (video id, k).

    Returns (keep, partner_rows, missing): `keep` the primary rows found in every partner,
    `partner_rows[j][i]` the row of partner j for keep[i], `missing[j]` the primary rows absent from partner j.
    """
    indexes = [{key: row for row, key in enumerate(zip(p.video_ids, p.ks))} for p in partners]
    keep, partner_rows, missing = [], [[] for _ in partners], [[] for _ in partners]
    for row, key in enumerate(zip(primary.video_ids, primary.ks)):
        found = [index.get(key) for index in indexes]
        if None in found:
            for j, r in enumerate(found):
                if r is None:
                    missing[j].append(row)
            continue
        keep.append(row)
        for j, r in enumerate(found):
            partner_rows[j].append(r)
    return keep, partner_rows, missing


def pair_captions(primary, partners, strict=False):
    """Pair the primary CaptionFile with partner CaptionFiles by (video id, k) (docs/data.md, 'Pairing captions').

    Returns (keep, partner_rows) as in `match_captions`. Primary captions lacking a partner are skipped
    with one logged warning (count, first ids, partner file); with strict=True that is a DataError."""
    keep, partner_rows, missing = match_captions(primary, partners)
    if any(missing):
        lacking = len(primary) - len(keep)
        details = '; '.join(
            f'{len(rows)} not in {p.path} (first: {", ".join(primary.cap_ids[r] for r in rows[:_SHOW])})'
            for p, rows in zip(partners, missing) if rows)
        message = f'{primary.path}: {lacking} of {len(primary)} captions have no partner caption with the same ' \
                  f'video id and k: {details}'
        if strict:
            raise DataError(f'{message}; fix the files or drop --strict to skip these captions')
        logger.warning('%s; they are skipped', message)
    return keep, partner_rows
