"""Datasets and collate functions (docs/data.md).

Work happens once, not per item: every caption file is read, paired by (video id, caption index k) and
tokenised in one batched call of a fast tokenizer when its table is built; features are one memory map;
`__getitem__` only gathers rows and, for MLCMR training, draws the [MASK] and frame-drop augmentations
(docs/data.md, 'MLCMR augmentations') from a generator seeded by (seed, epoch, index), so a run is repeatable whatever the
number of workers.

Batches are dicts of tensors:
    video  = {'frames' (B, L, D), 'mask' (B, L) float, 'lengths' (B,) long, 'mean' (B, D)}
    stream = {'ids' (B, L) long, 'mask' (B, L) float, 'lengths' (B,) long}
    train batch = {'index', 'video': video, 'text': {role: stream}, 'same_video' (B, B) bool
                   [, 'video_aug': video (MLCMR)]}
    video batch = {'index', 'video': video};  text batch = {'index', 'text': {role: stream}}
"""
import functools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from basic import paths
from basic.bigfile import BigFile
from basic.captions import clean_english, pair_captions, read_captions, video_order
from basic.errors import DataError
from basic.video2frames import load_video2frames
from basic import checkpoint as ckpt
from basic import image_data
from basic.batching import collate, collate_ids, collate_video, move_to  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

VIDEO_MAX_LEN = 64
MASK_RATIO = 0.15          # docs/data.md, 'MLCMR augmentations'
FRAME_DROP_RATIO = 0.8     # docs/data.md, 'MLCMR augmentations'


# ============ tokenisation ============

@functools.lru_cache(maxsize=4)
def build_tokenizer(name_or_path, lower_case=True):
    """The fast WordPiece tokenizer of `name_or_path`. lower_case=True is the parity default (docs/data.md, 'Tokenizer':
    mBERT-cased loaded with do_lower_case=True, which also strips accents)."""
    from transformers import BertTokenizerFast
    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(name_or_path, n))
                                               for n in ('vocab.txt', 'tokenizer.json')):
        # transformers would build a 5-token tokenizer that maps every word to [UNK], silently
        raise DataError(f'tokenizer {name_or_path}: the folder holds neither vocab.txt nor tokenizer.json; pass '
                        '--bert_name a folder saved with save_pretrained (or restore the file)')
    try:
        return BertTokenizerFast.from_pretrained(name_or_path, do_lower_case=lower_case)
    except (OSError, ValueError) as e:
        raise DataError(f'tokenizer {name_or_path}: could not load ({str(e).splitlines()[0]}); '
                        'pass --bert_name a local folder holding vocab.txt, or download the model once') from None


def tokenize(tokenizer, texts, chunk=8192):
    """Token ids `[CLS] ... [SEP]` per text (no truncation, docs/data.md, 'Tokenizer'), as int32 arrays. A text
    tower's tokenizer (nets/text_towers.py, it has `token_ids`) gives the ids its own library would."""
    if hasattr(tokenizer, 'token_ids'):
        return tokenizer.token_ids(texts)
    out = []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(texts[i:i + chunk], add_special_tokens=True, truncation=False,
                        return_attention_mask=False, return_token_type_ids=False)
        out.extend(np.asarray(ids, dtype=np.int32) for ids in enc['input_ids'])
    return out


def _prepare_texts(cf, clean):
    """Apply English cleaning (docs/data.md, 'English cleaning') per the stream's rule ('en', 'raw', or 'auto' by tag)."""
    if clean == 'en':
        return [clean_english(t) for t in cf.texts]
    if clean == 'auto':
        return [clean_english(t) if tag.startswith('en') else t for t, tag in zip(cf.texts, cf.tags)]
    return list(cf.texts)


# ============ caption tables ============

@dataclass
class CaptionTable:
    """Aligned caption streams: row i of every role describes the same (video, k)."""
    cap_ids: list                      # ids of the primary stream
    video_ids: list                    # video of each row
    tokens: dict                       # role -> list of int32 arrays
    files: dict = field(default_factory=dict)   # role -> path

    def __len__(self):
        return len(self.cap_ids)

    @property
    def videos(self):
        """Distinct videos in first-appearance order of the primary file (docs/data.md, 'Caption files')."""
        return video_order(self.video_ids)

    def cap2vid(self):
        index = {v: i for i, v in enumerate(self.videos)}
        return torch.tensor([index[v] for v in self.video_ids], dtype=torch.long)


def load_caption_table(rootpath, collection, streams, tokenizer, strict=False):
    """Read, pair (by video id and k) and tokenise caption streams; the first stream is the primary."""
    files = [read_captions(paths.resolve_stream(rootpath, collection, s)) for s in streams]
    keep, partner_rows = pair_captions(files[0], files[1:], strict=strict)
    primary = files[0]
    if not keep:
        raise DataError(f'{primary.path}: none of its {len(primary)} captions has a partner with the same video id '
                        f'and k in {" and ".join(cf.path for cf in files[1:])}; these files do not belong '
                        'together: check --collection, --data_type and the file contents')
    tokens = {}
    for j, (stream, cf) in enumerate(zip(streams, files)):
        rows = keep if j == 0 else partner_rows[j - 1]
        texts = _prepare_texts(cf, stream.clean)
        tokens[stream.role] = tokenize(tokenizer, [texts[r] for r in rows])
    return CaptionTable(cap_ids=[primary.cap_ids[r] for r in keep],
                        video_ids=[primary.video_ids[r] for r in keep],
                        tokens=tokens, files={s.role: cf.path for s, cf in zip(streams, files)})


def derive_half_table(rootpath, collection, tokenizer, seed=0):
    """Non-parallel training data when `<C>train_half.caption.txt` is absent (issue #4): the training
    videos are split in two halves by a seeded permutation of their sorted ids; the English human captions
    of the first half and the Chinese human captions of the second half form one stream 'half'."""
    en = read_captions(paths.resolve_stream(rootpath, collection, paths.CaptionStream(
        paths.ROLE_EN, (f'{collection}train.caption.txt',), 'en')))
    zh = read_captions(paths.resolve_stream(rootpath, collection, paths.CaptionStream(
        paths.ROLE_ZH, (f'{collection}train_zh.caption.txt',), 'raw')))
    videos = sorted(set(en.video_ids) | set(zh.video_ids))
    perm = np.random.default_rng(seed).permutation(len(videos))
    english_half = {videos[i] for i in perm[:len(videos) // 2]}
    cap_ids, video_ids, texts = [], [], []
    for cf, lang_is_en in ((en, True), (zh, False)):
        for cap_id, vid, text in zip(cf.cap_ids, cf.video_ids, cf.texts):
            if (vid in english_half) == lang_is_en:
                cap_ids.append(cap_id)
                video_ids.append(vid)
                texts.append(clean_english(text) if lang_is_en else text)
    if not cap_ids:     # e.g. the English and the Chinese file describe disjoint halves that the split swapped
        raise DataError(f'{en.path} + {zh.path}: the derived non-parallel split holds no caption; give '
                        f'{collection}train_half.caption.txt explicitly')
    logger.info('%s not found: derived a non-parallel split from %s and %s (%d videos with English, '
                '%d with Chinese captions, seed %d)', f'{collection}train_half.caption.txt', en.path,
                zh.path, len(english_half), len(videos) - len(english_half), seed)
    return CaptionTable(cap_ids, video_ids, {paths.ROLE_HALF: tokenize(tokenizer, texts)},
                        files={paths.ROLE_HALF: f'derived from {en.path} + {zh.path}'})


# ============ frames ============

class FrameStore:
    """Frame features of one collection: a memory-mapped BigFile plus the video -> frames mapping."""

    def __init__(self, feature_dir):
        self.bigfile = BigFile(feature_dir)
        self.video2frames = load_video2frames(feature_dir, self.bigfile.names)
        self.dim = self.bigfile.ndims
        self.path = feature_dir

    def check_videos(self, video_ids, source):
        """Every caption's video must have frames; else one error naming the first few videos."""
        missing = [v for v in dict.fromkeys(video_ids) if not self.video2frames.get(v)]
        if missing:
            raise DataError(f'{source}: {len(missing)} videos have no frames in {self.path} '
                            f'(first: {", ".join(missing[:5])}); check --visual_feature and video2frames.txt')

    def frames(self, video_id):
        return self.bigfile.read(self.video2frames[video_id])          # (n, D) float32


def cap_frames(frames, max_len=VIDEO_MAX_LEN, sampling='first'):
    """docs/data.md, 'Video batches': keep the first `max_len` frames (parity) or `max_len` uniformly spaced ones."""
    n = len(frames)
    if n <= max_len:
        return frames
    if sampling == 'first':
        return frames[:max_len]
    return frames[np.linspace(0, n - 1, max_len).round().astype(np.int64)]


def drop_frames(n, rng, ratio=FRAME_DROP_RATIO):
    """docs/data.md, 'Frame drop': indices kept after removing floor(ratio·n) distinct frames, in original order (>= 1)."""
    removed = rng.choice(n, size=int(np.floor(ratio * n)), replace=False)
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return np.flatnonzero(keep)


def mask_tokens(ids, rng, mask_id, ratio=MASK_RATIO):
    """docs/data.md, '[MASK] augmentation': replace floor(ratio·n) distinct positions from 1..n-2 by [MASK] (never [CLS]/[SEP])."""
    n = len(ids)
    m = int(np.floor(ratio * n))
    out = ids.copy()
    if m > 0:
        out[1 + rng.choice(n - 2, size=m, replace=False)] = mask_id
    return out


def _video_item(frames, max_len, sampling):
    """(capped frames, mean over ALL frames) — docs/data.md, 'Video batches', takes the mean before truncation."""
    return cap_frames(frames, max_len, sampling), frames.mean(axis=0)


# ============ datasets ============

class TrainDataset(Dataset):
    """One item per caption row: its video's frames and every caption stream (docs/data.md).
    With `augment` (MLCMR) it adds a frame-dropped video and a masked copy of each stream."""

    def __init__(self, table, store, augment=False, mask_id=103, max_frames=VIDEO_MAX_LEN,
                 frame_sampling='first', seed=0):
        store.check_videos(table.video_ids, next(iter(table.files.values()), 'caption table'))
        self.table, self.store, self.augment, self.mask_id = table, store, augment, mask_id
        self.max_frames, self.frame_sampling, self.seed, self.epoch = max_frames, frame_sampling, seed, 0
        videos = table.videos
        index = {v: i for i, v in enumerate(videos)}
        self.video_index = np.array([index[v] for v in table.video_ids], dtype=np.int64)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        frames = self.store.frames(self.table.video_ids[i])
        item = {'index': i, 'video_index': self.video_index[i],
                'video': _video_item(frames, self.max_frames, self.frame_sampling),
                'text': {role: toks[i] for role, toks in self.table.tokens.items()}}
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            item['video_aug'] = _video_item(frames[drop_frames(len(frames), rng)], self.max_frames,
                                            self.frame_sampling)
            for role in list(item['text']):
                item['text'][paths.masked_role(role)] = mask_tokens(item['text'][role], rng, self.mask_id)
        return item


class VideoDataset(Dataset):
    """Evaluation videos, in the given order."""

    def __init__(self, video_ids, store, max_frames=VIDEO_MAX_LEN, frame_sampling='first'):
        self.video_ids, self.store = list(video_ids), store
        self.max_frames, self.frame_sampling = max_frames, frame_sampling

    def __len__(self):
        return len(self.video_ids)

    def __getitem__(self, i):
        frames = self.store.frames(self.video_ids[i])
        return {'index': i, 'video': _video_item(frames, self.max_frames, self.frame_sampling)}


class TextDataset(Dataset):
    """Evaluation captions of a table, in file order."""

    def __init__(self, table):
        self.table = table

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return {'index': i, 'text': {role: toks[i] for role, toks in self.table.tokens.items()}}


# ============ collate (basic/batching.py, shared with the evaluation loops) ============

def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)


def make_loader(dataset, batch_size, shuffle=False, workers=0, seed=0, sampler=None, pin_memory=False):
    """DataLoader with the shared collate, a seeded generator and seeded workers."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory, drop_last=False,
                      generator=g, worker_init_fn=_seed_worker, persistent_workers=False)


# ============ the data config ============

# What the data side of a run reads, as one plain dict (`data_cfg`): built once by the trainer from its
# flags, stored in every checkpoint beside `model_cfg`, and re-used by the tester with its command-line
# overrides. The root folder is not part of it (it belongs to the machine, not to the run).
DATA_DEFAULTS = dict(
    model='nrccr',                  # whose caption streams are read: the scheme 'nrccr' or 'mlcmr' (the model
                                    # class's CAPTIONS; the multilingual CLIP model reads NRCCR's)
    collection='vatex',
    visual_feature='i3d_kinetics',  # folder under <rootpath>/<collection>/FeatureData
    data_type='google_enc2zh',      # NRCCR translation files <C>train_<data_type>
    train_mode='parallel',          # MLCMR: parallel | unparallel
    label_situation='translate',    # MLCMR: human_label | translate
    target_language='zh',           # MLCMR: zh | en
    frame_sampling='first',         # videos over 64 frames: first 64 (parity) | uniform
    bert_name='bert-base-multilingual-cased',   # tokenizer source
    tokenizer_lower_case=True,      # parity: lower-case and strip accents even for the cased mBERT
    val_split='val',                # caption files used for validation
    strict=False,                   # a caption whose partner caption is missing: skip (False) or error
    # image collections (docs/data.md, 'Image collections'); a video run keeps these defaults
    model_type='video',             # video | img: which store and caption naming the data layer uses
    task=1,                         # Multi-30K task 1 | 2
    img_encoder=None,               # images: clip | resnet_152 (the encoder whose features are read)
    clean_eval='raw',               # images: the English MT of val/test raw (the original) | en (cleaned)
)


def data_config(**overrides):
    """The full data config: DATA_DEFAULTS updated with `overrides` (unknown keys are an error)."""
    unknown = set(overrides) - set(DATA_DEFAULTS)
    if unknown:
        raise KeyError(f'unknown data config keys: {sorted(unknown)}')
    return dict(DATA_DEFAULTS, **overrides)


def data_config_from_train_args(train_args):
    """The data config of a checkpoint written before `data_cfg` was stored (or of an original NRCCR
    release checkpoint, whose options name the collection `trainCollection`): taken from its stored
    arguments, with the defaults for what they lack.

    The original options of every run hold `model_type` ('video' unless an image run), `img_encoder`
    (default 'clip') and `task` (default 2); they count for image runs only. An original CLIP image run read
    JPEGs, so its `visual_feature` names nothing it used: the CLIP feature folder of the collection is read."""
    cfg = {k: train_args[k] for k in DATA_DEFAULTS if train_args.get(k) is not None}
    if 'collection' not in cfg and train_args.get('trainCollection'):
        cfg['collection'] = train_args['trainCollection']
    cfg.setdefault('collection', None)
    if cfg.get('model_type', 'video') != 'img':
        for key in ('model_type', 'task', 'img_encoder', 'clean_eval'):
            cfg.pop(key, None)
        return dict(DATA_DEFAULTS, **cfg)
    cfg['img_encoder'] = image_data.img_encoder_name(cfg.get('img_encoder'))
    cfg['task'] = int(cfg.get('task', 1))
    if cfg['img_encoder'] == 'clip' and cfg['collection']:
        cfg['visual_feature'] = image_data.default_feature(cfg['collection'], 'clip')
    return dict(DATA_DEFAULTS, **cfg)


def checkpoint_data_config(path, train_args):
    """The data config a checkpoint was trained with: its stored `data_cfg` over DATA_DEFAULTS, or, for a
    checkpoint that predates it, derived from its stored arguments (`train_args`, as model.load_model returns
    them; NRCCR or MLCMR, whose caption schemes carry their names). The tester and util/searcher.py apply their
    overrides to it."""
    stored = ckpt.load_checkpoint(path, map_location='meta').get('data_cfg')   # meta: no tensor is read
    return dict(DATA_DEFAULTS, **stored) if stored else data_config_from_train_args(train_args)


def target_language(data_cfg):
    """The query language the test files depend on: MLCMR's caption scheme has one per run (zh or en); NRCCR's
    reads its target from data_type, so None."""
    return data_cfg['target_language'] if data_cfg['model'] == 'mlcmr' else None


def is_image(data_cfg):
    return data_cfg.get('model_type', 'video') == 'img'


def open_store(rootpath, data_cfg, split):
    """The visual store a split reads: the collection's FrameStore (one for every split) for video, the
    split's ImageStore (its own id file and features) for images."""
    if is_image(data_cfg):
        return image_data.open_image_store(rootpath, data_cfg, split)
    return FrameStore(paths.feature_dir(rootpath, data_cfg['collection'], data_cfg['visual_feature']))


def open_stores(rootpath, data_cfg, splits):
    """{split: store} for `splits`; a video collection opens its one FrameStore once."""
    if is_image(data_cfg):
        return {s: open_store(rootpath, data_cfg, s) for s in dict.fromkeys(splits)}
    store = open_store(rootpath, data_cfg, None)
    return {s: store for s in splits}


# ============ what each model reads ============

def train_table(rootpath, data_cfg, tokenizer):
    """The training caption table of the run's caption scheme (data_cfg['model']) and mode (docs/data.md, 'NRCCR caption
    files', 'MLCMR caption files')."""
    cfg, C = data_cfg, data_cfg['collection']
    if is_image(cfg):
        streams = image_data.image_streams(rootpath, cfg, 'train')
    elif cfg['model'] == 'nrccr':
        streams = paths.nrccr_streams(C, 'train', cfg['data_type'])
    elif cfg['train_mode'] == 'unparallel':
        half = paths.mlcmr_streams(C, 'train', 'unparallel')[0]
        if not any(os.path.exists(os.path.join(paths.text_dir(rootpath, C), n)) for n in half.candidates):
            return derive_half_table(rootpath, C, tokenizer, seed=0)
        streams = [half]
    else:
        streams = paths.mlcmr_streams(C, 'train', cfg['train_mode'], cfg['label_situation'],
                                      cfg['target_language'])
    return load_caption_table(rootpath, C, streams, tokenizer, strict=cfg['strict'])


def eval_table(rootpath, data_cfg, split, tokenizer, purpose='test', target_language=None):
    """Evaluation captions with roles 'primary' and 'second' (docs/data.md, 'NRCCR caption files', 'MLCMR caption files').

    MLCMR validates on `<C><split>.caption.txt` + `<C><split>_zh.caption.txt` whatever the target language
    (the trainer passes split='test' for MSR-VTT, the reference's parity quirk) and tests on the files of
    the target language (`target_language`, default the config's). Image collections: docs/data.md,
    'Image collections' (primary = the English MT, second = the human caption)."""
    cfg, C = data_cfg, data_cfg['collection']
    if is_image(cfg):
        streams = image_data.image_streams(rootpath, cfg, split)
    elif cfg['model'] == 'nrccr':
        streams = paths.nrccr_streams(C, split, cfg['data_type'])
    elif purpose == 'val':
        streams = paths.mlcmr_val_streams(C, split)
    else:
        streams = paths.mlcmr_streams(C, split, cfg['train_mode'], cfg['label_situation'],
                                      target_language or cfg['target_language'])
    streams = [paths.CaptionStream(role, s.candidates, s.clean)
               for role, s in zip((paths.ROLE_PRIMARY, paths.ROLE_SECOND), streams)]
    return load_caption_table(rootpath, C, streams, tokenizer, strict=cfg['strict'])


class EvalData:
    """Videos and captions of one evaluation split, built once: `split`, `table` (roles 'primary', 'second'),
    `videos` (ids, first-appearance order), `cap2vid`, and the `video_set` / `text_set` the encoding loops
    read."""

    def __init__(self, rootpath, data_cfg, split, tokenizer, store, purpose, target_language=None):
        self.split = split
        self.table = eval_table(rootpath, data_cfg, split, tokenizer, purpose=purpose,
                                target_language=target_language)
        store.check_videos(self.table.video_ids, self.table.files[paths.ROLE_PRIMARY])
        self.videos = self.table.videos
        self.cap2vid = self.table.cap2vid()
        self.video_set = VideoDataset(self.videos, store, frame_sampling=data_cfg['frame_sampling'])
        self.text_set = TextDataset(self.table)
