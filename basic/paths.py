"""File naming of a VisualSearch root (docs/data.md).

A caption stream names the file(s) one model branch reads, in `<rootpath>/<collection>/TextData/`. Where the
two references name the same file differently (Chinese->English MT: NRCCR `zh2enc`, MLCMR `zhc2en`) a stream
lists both and the first existing one is used. The primary stream, which drives the dataset, comes first in
every list.
"""
import os
from dataclasses import dataclass

from basic.errors import DataError

PRESETS = {
    'vatex': {'feature': 'i3d_kinetics', 'dims': 1024},
    'msrvttcn': {'feature': 'resnext101-resnet152', 'dims': 4096},
    'toy': {'feature': 'toy_feature', 'dims': None},
}

SPLITS = ('train', 'val', 'test')
TRAIN_MODES = ('parallel', 'unparallel')
LABEL_SITUATIONS = ('human_label', 'translate')
TARGET_LANGUAGES = ('zh', 'en')
CLEAN_RULES = ('en', 'raw', 'auto')

# Caption roles: the names of the caption streams in tables and batches (batch['text'][role]).
ROLE_SRC, ROLE_TR, ROLE_BT = 'src', 'tr', 'bt'         # NRCCR training: source, translation, back-translation
ROLE_PRIMARY, ROLE_SECOND = 'primary', 'second'        # evaluation: the two matrices that are fused
ROLE_EN, ROLE_ZH, ROLE_HALF = 'en', 'zh', 'half'       # MLCMR training; 'half' = the non-parallel mixed stream
MLCMR_TRAIN_ROLES = (ROLE_EN, ROLE_ZH, ROLE_HALF)
MASKED_SUFFIX = '_masked'                              # MLCMR: the [MASK]-augmented copy of a stream


def masked_role(role):
    return f'{role}{MASKED_SUFFIX}'


@dataclass(frozen=True)
class CaptionStream:
    role: str                  # e.g. 'src', 'tr', 'bt', 'primary', 'second', 'en', 'zh', 'half'
    candidates: tuple          # file names inside <root>/<C>/TextData, first existing one wins
    clean: str                 # 'en' (apply clean_english), 'raw', or 'auto' (per line: tag starts with 'en' -> en)

    def __post_init__(self):
        if self.clean not in CLEAN_RULES:
            raise ValueError(f'clean must be one of {CLEAN_RULES}, got {self.clean!r}')


def collection_dir(rootpath, collection):
    return os.path.join(rootpath, collection)


def text_dir(rootpath, collection):
    return os.path.join(rootpath, collection, 'TextData')


def feature_dir(rootpath, collection, feature):
    return os.path.join(rootpath, collection, 'FeatureData', feature)


def resolve_stream(rootpath, collection, stream):
    """Path of the first existing candidate file of `stream`; DataError listing every candidate if none."""
    folder = text_dir(rootpath, collection)
    for name in stream.candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise DataError(f'{folder}: no caption file for stream {stream.role!r} (tried {", ".join(stream.candidates)}); '
                    'put one there or check --rootpath and --collection')


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def _file(collection, split, suffix=''):
    return f'{collection}{split}{suffix}.caption.txt'


def nrccr_streams(collection, split, data_type='google_enc2zh'):
    """NRCCR video caption streams (docs/data.md, 'NRCCR caption files').

    train: src (English human, cleaned), tr (`_<data_type>`), bt (`_<data_type>2enc`; the reference
    hard-codes `_google_enc2zh2enc`, which is what the default data_type gives).
    val/test: primary = MT of the target language xx into English (`_<p>_<xx>2enc`, or MLCMR's
    `_<p>_<xx>c2en`; p = first `_`-field of data_type, xx = what follows `enc2`), cleaned; second = the
    human target-language captions `_<xx>`, raw."""
    _check('split', split, SPLITS)
    C = collection
    if split == 'train':
        return [CaptionStream(ROLE_SRC, (_file(C, 'train'),), 'en'),
                CaptionStream(ROLE_TR, (_file(C, 'train', f'_{data_type}'),), 'raw'),
                CaptionStream(ROLE_BT, (_file(C, 'train', f'_{data_type}2enc'),), 'raw')]
    if 'enc2' not in data_type:
        raise ValueError(f'data_type {data_type!r} does not name a target language ("<provider>_enc2<xx>")')
    provider, xx = data_type.split('_')[0], data_type.split('enc2', 1)[1]
    return [CaptionStream(ROLE_PRIMARY, (_file(C, split, f'_{provider}_{xx}2enc'),
                                      _file(C, split, f'_{provider}_{xx}c2en')), 'en'),
            CaptionStream(ROLE_SECOND, (_file(C, split, f'_{xx}'),), 'raw')]


def mlcmr_val_streams(collection, split='val'):
    """MLCMR validation streams of any split: en `<C><split>` (cleaned) + zh `<C><split>_zh` (raw). The MSR-VTT
    parity quirk (docs/data.md, 'MLCMR caption files') validates on split='test'."""
    return [CaptionStream(ROLE_EN, (_file(collection, split),), 'en'),
            CaptionStream(ROLE_ZH, (_file(collection, split, '_zh'),), 'raw')]


def mlcmr_streams(collection, split, train_mode='parallel', label_situation='translate', target_language='zh'):
    """MLCMR caption streams (docs/data.md, 'MLCMR caption files'), roles 'en' and 'zh' ('half' for unparallel training).

    train: parallel/human_label: en human + zh human; parallel/translate/zh: en human + en->zh MT;
    parallel/translate/en: zh->en MT + zh human; unparallel: the mixed `_half` file, cleaned per line by tag.
    val: `mlcmr_val_streams(C, 'val')`. test: target zh: zh->en MT + zh human; target en: en human + en->zh MT.
    """
    _check('split', split, SPLITS)
    _check('train_mode', train_mode, TRAIN_MODES)
    _check('label_situation', label_situation, LABEL_SITUATIONS)
    _check('target_language', target_language, TARGET_LANGUAGES)
    C = collection
    if split == 'val':
        return mlcmr_val_streams(C, 'val')
    if split == 'train' and train_mode == 'unparallel':
        return [CaptionStream(ROLE_HALF, (_file(C, 'train', '_half'),), 'auto')]
    en_human = CaptionStream(ROLE_EN, (_file(C, split),), 'en')
    en_mt = CaptionStream(ROLE_EN, (_file(C, split, '_google_zhc2en'), _file(C, split, '_google_zh2enc')), 'en')
    zh_human = CaptionStream(ROLE_ZH, (_file(C, split, '_zh'),), 'raw')
    zh_mt = CaptionStream(ROLE_ZH, (_file(C, split, '_google_enc2zh'),), 'raw')
    if split == 'train' and label_situation == 'human_label':
        return [en_human, zh_human]
    # English is the MT side when training for target en (translate) or testing target zh
    english_is_mt = target_language == ('en' if split == 'train' else 'zh')
    return [en_mt, zh_human] if english_is_mt else [en_human, zh_mt]


# ============ image collections (Multi-30K, MSCOCO) ============
# The NRCCR image variant: an image is a one-frame video, so the caption roles are the video ones
# ('src', 'tr', 'bt' in training; 'primary' = MT of the target language into English, 'second' = the human
# target-language caption in validation and test). Names follow the original image code.

IMAGE_PRESETS = {
    'multi30k': {'feature': 'clip_vit_b32', 'dims': 512, 'languages': ('de', 'fr', 'cs'), 'tasks': (1, 2)},
    'mscoco': {'feature': 'clip_vit_b32', 'dims': 512, 'languages': ('zh', 'ja'), 'tasks': (1,)},
    'toyimg': {'feature': 'toy_clip', 'dims': None, 'languages': ('de', 'fr', 'cs'), 'tasks': (1,)},
}
IMAGE_FEATURE_DIMS = {'clip_vit_b32': 512, 'resnet_152': 2048}   # the two encoders' inputs
TASK2_TRAIN_PREFIX = 'Flickr30ktrain'                           # Multi-30K task 2 training captions


def image_family(collection):
    """'mscoco' for MSCOCO-style naming (per-language val/test ids), else 'multi30k'."""
    return 'mscoco' if collection.startswith('mscoco') else 'multi30k'


def image_target(data_type):
    """'google_enc2de' -> ('google', 'de'); ValueError unless data_type is '<provider>_enc2<xx>'."""
    provider, _, rest = data_type.partition('_')
    if not (provider and rest.startswith('enc2') and rest[4:].isalpha()):
        raise ValueError(f'data_type {data_type!r}: expected "<provider>_enc2<xx>", e.g. google_enc2de')
    return provider, rest[4:]


def image_suffix(data_type, task):
    """'_task1' for German task 1 captions (Multi-30K task 2 has German captions of its own), else ''."""
    return '_task1' if image_target(data_type)[1] == 'de' and task == 1 else ''


def image_streams(collection, split, data_type='google_enc2de', task=1, clean_eval='raw'):
    """NRCCR caption streams of an image collection.

    train: src `<C>train_enc` (cleaned), tr `<C>train_<data_type>`, bt `<C>train_<data_type>2enc` (raw);
    Multi-30K task 2 uses the prefix `Flickr30ktrain` instead of `<C>train`.
    val: primary `<C>val_<p>_<xx>2enc<s>`, second `<C>val_<xx><s>`;
    test: primary `<C>test_<p>_<xx>2enc_2016<s>`, second `<C>test_<xx>_2016<s>` (MSCOCO also without `_2016`);
    s = '_task1' for German task 1. The original image code tokenises both evaluation streams raw
    (`clean_eval='raw'`); 'en' cleans the English MT as the video variant does."""
    _check('split', split, SPLITS)
    _check('task', task, (1, 2))
    _check('clean_eval', clean_eval, ('raw', 'en'))
    provider, xx = image_target(data_type)
    C = collection
    if split == 'train':
        if task == 2 and image_family(C) != 'multi30k':
            raise ValueError(f'task 2 exists for Multi-30K only, not {C!r}')
        prefix = TASK2_TRAIN_PREFIX if task == 2 else f'{C}train'
        return [CaptionStream('src', (f'{prefix}_enc.caption.txt',), 'en'),
                CaptionStream('tr', (f'{prefix}_{data_type}.caption.txt',), 'raw'),
                CaptionStream('bt', (f'{prefix}_{data_type}2enc.caption.txt',), 'raw')]
    s = image_suffix(data_type, task)
    year = '_2016' if split == 'test' else ''
    mt, human = f'{C}{split}_{provider}_{xx}2enc', f'{C}{split}_{xx}'
    if split == 'test' and image_family(C) == 'mscoco':
        return [CaptionStream('primary', (f'{mt}{year}{s}.caption.txt', f'{mt}{s}.caption.txt'), clean_eval),
                CaptionStream('second', (f'{human}{year}{s}.caption.txt', f'{human}{s}.caption.txt'), 'raw')]
    return [CaptionStream('primary', (f'{mt}{year}{s}.caption.txt',), clean_eval),
            CaptionStream('second', (f'{human}{year}{s}.caption.txt',), 'raw')]


def image_id_file(rootpath, collection, split, feature, data_type='google_enc2de'):
    """The image-id list of a split (one id per line, row i of the split's .npy):
    train `FeatureData/train_id.txt`; val `FeatureData/val_id.txt` (MSCOCO `FeatureData/<xx>_val_id.txt`);
    test `FeatureData/<feature>/test_id_2016.txt` (MSCOCO `FeatureData/<feature>/<xx>_test_id.txt`)."""
    _check('split', split, SPLITS)
    fdata = os.path.join(rootpath, collection, 'FeatureData')
    mscoco = image_family(collection) == 'mscoco'
    xx = image_target(data_type)[1]
    if split == 'train':
        return os.path.join(fdata, 'train_id.txt')
    if split == 'val':
        return os.path.join(fdata, f'{xx}_val_id.txt' if mscoco else 'val_id.txt')
    return os.path.join(fdata, feature, f'{xx}_test_id.txt' if mscoco else 'test_id_2016.txt')


def image_npy_candidates(rootpath, collection, split, feature, data_type='google_enc2de'):
    """Paths of a split's feature array, first existing one wins: `FeatureData/<feature>/<split>-<feature>-avgpool.npy`
    (test: `test_2016_flickr-<feature>-avgpool.npy`, also with the feature name's '_' dropped, e.g.
    `resnet152` for `resnet_152`, as the original hard-coded it; MSCOCO val/test: `<xx>_<split>-...` first)."""
    _check('split', split, SPLITS)
    fdir = feature_dir(rootpath, collection, feature)
    xx = image_target(data_type)[1]
    if split == 'train':
        names = [f'train-{feature}-avgpool.npy']
    elif image_family(collection) == 'mscoco':
        names = [f'{xx}_{split}-{feature}-avgpool.npy', f'{split}-{feature}-avgpool.npy']
    elif split == 'val':
        names = [f'val-{feature}-avgpool.npy']
    else:
        names = [f'test_2016_flickr-{feature}-avgpool.npy']
        if '_' in feature:
            names.append(f'test_2016_flickr-{feature.replace("_", "")}-avgpool.npy')
    return tuple(os.path.join(fdir, n) for n in names)
