"""Build a small, learnable toy collection in the VisualSearch layout (docs/data.md) with NRCCR/MLCMR file naming.

    python util/make_toy_data.py --root toy_data                      # default sizes, a few seconds
    python util/make_toy_data.py --root toy_data --n_train 2000 --mt_noise 0.5 --overwrite

Every video is one concept per slot (subject, action, scene, colour) drawn from a parallel English/Chinese
lexicon (`LEXICON`). Frame features are a seeded function of those concepts plus temporal variation and noise,
so retrieval can be learnt. Human captions name the concepts through varied templates (Chinese ones are written
independently of the English ones); machine translations start from the concepts of their source caption
and corrupt each with probability `mt_noise` (dropped, or swapped for another concept of the same slot) and
scramble the phrase order with the same probability, so noisy translations hurt.

Written (C = collection, R = root):
    R/C/FeatureData/toy_feature/{feature.bin,id.txt,shape.txt,video2frames.txt}
    R/C/TextData/Ctrain{,_google_enc2zh,_google_enc2zh2enc,_zh,_google_zhc2en}.caption.txt
    R/C/TextData/C{val,test}{,_zh,_google_zh2enc,_google_enc2zh}.caption.txt
    R/tiny_bert/{config.json,vocab.txt,model.safetensors}   (mBERT special-token ids, 12 tiny layers)
The same seed gives byte-identical files. Real-file quirks are copied on purpose: `_google_enc2zh` files use
CRLF, `_zh` files have no final newline, some English captions have runs of spaces, and the `_zh`-based files
list videos in another order than the English ones.
"""
import argparse
import os
import re
import shutil
import sys
import time
from collections import namedtuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basic.bigfile import write_bigfile  # noqa: E402

FEATURE_NAME = 'toy_feature'
BERT_DIR_NAME = 'tiny_bert'
SPLITS = ('train', 'val', 'test')

# ============ parallel lexicon ============
# No Chinese word is a substring of another or of any template text, and English concepts are distinct word
# sequences, so the concepts of a caption can be read back exactly (tests rely on this).
Concept = namedtuple('Concept', 'en zh')
SLOTS = ('subject', 'action', 'scene', 'colour')
LEXICON = {
    'subject': (Concept('man', '男人'), Concept('woman', '女人'), Concept('boy', '男孩'), Concept('girl', '女孩'),
                Concept('chef', '厨师'), Concept('dancer', '舞者'), Concept('dog', '小狗'), Concept('cat', '小猫'),
                Concept('farmer', '农民'), Concept('student', '学生'), Concept('soldier', '士兵'),
                Concept('teenager', '少年')),
    'action': (Concept('running', '跑步'), Concept('jumping', '跳跃'), Concept('dancing', '跳舞'),
               Concept('cooking', '做饭'), Concept('swimming', '游泳'), Concept('singing', '唱歌'),
               Concept('playing guitar', '弹吉他'), Concept('riding a bike', '骑自行车'),
               Concept('painting', '画画'), Concept('reading a book', '看书'), Concept('climbing', '攀爬'),
               Concept('throwing a ball', '扔球')),
    'scene': (Concept('park', '公园'), Concept('kitchen', '厨房'), Concept('beach', '海滩'), Concept('street', '街道'),
              Concept('gym', '健身房'), Concept('classroom', '教室'), Concept('forest', '森林'),
              Concept('stage', '舞台'), Concept('lake', '湖边'), Concept('garden', '花园'),
              Concept('office', '办公室'), Concept('snow', '雪地')),
    'colour': (Concept('red', '红色'), Concept('blue', '蓝色'), Concept('green', '绿色'), Concept('yellow', '黄色'),
               Concept('black', '黑色'), Concept('white', '白色')),
}
ESSENTIAL_SLOTS = ('subject', 'action')  # human captions always name these; scene or colour may be left out
SLOT_WEIGHTS = {'subject': 1.0, 'action': 1.0, 'scene': 0.7, 'colour': 0.5}  # feature contribution per slot
EN_SCENE_PREP = {'park': 'in', 'kitchen': 'in', 'beach': 'on', 'street': 'on', 'gym': 'in', 'classroom': 'in',
                 'forest': 'in', 'stage': 'on', 'lake': 'by', 'garden': 'in', 'office': 'in', 'snow': 'in'}
ZH_SCENE_SUFFIX = {'公园': '里', '厨房': '里', '海滩': '上', '街道': '上', '健身房': '里', '教室': '里',
                   '森林': '里', '舞台': '上', '湖边': '', '花园': '里', '办公室': '里', '雪地': '上'}

# ============ caption templates ============
# Placeholders: {np} subject phrase (with colour when present), {vp} action phrase, {pp} scene phrase.
EN_HUMAN = ('{np} is {vp} {pp}', '{pp} {np} is {vp}', 'there is {np} {vp} {pp}', '{np} {vp} {pp}',
            'a video of {np} {vp} {pp}', 'we see {np} who is {vp} {pp}')
EN_COLOUR = ('in a {c} shirt', 'wearing {c}', 'dressed in {c}', 'in {c} clothes')
EN_DET = ('a', 'the', 'one')
EN_ADVERBS = ('happily', 'slowly', 'carefully', 'quickly')
EN_MT = ('{np} is {vp} {pp}', '{np} {vp} {pp}', '{pp} , {np} is {vp}')
EN_MT_COLOUR = ('wearing {c} clothes', 'in {c} clothes')
EN_MT_DET = ('a', 'the')
EN_MT_NO_SUBJECT = 'someone'
# Chinese: no spaces; {det}{cpre}{s} subject phrase, {where} "在<scene>" or "正在" when no scene is named,
# {adv} adverb, {a} action.
ZH_HUMAN = ('{det}{cpre}{s}{where}{adv}{a}', '{sceneloc}{det}{cpre}{s}正在{adv}{a}', '{det}{s}{cpost}{where}{adv}{a}',
            '视频中{det}{cpre}{s}{where}{adv}{a}', '有{det}{cpre}{s}{where}{adv}{a}')
ZH_DET = ('一个', '一位', '')
ZH_CPRE = ('穿{c}衣服的', '穿着{c}衣服的')
ZH_CPOST = '，穿着{c}的衣服，'
ZH_ADVERBS = ('开心地', '慢慢地', '认真地', '快速地')
ZH_MT = ('{det}{cpre}{s}{where}{a}', '{det}{s}{cmt}{a}{place}')
ZH_MT_COLOUR = '穿{c}'
ZH_MT_NO_SUBJECT = '有人'


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _tidy(text):
    """Collapse the gaps left by empty placeholders."""
    return re.sub(r'\s+', ' ', text).replace(' ,', ',').strip(' ,')


# ============ rendering: concepts -> text ============
# A caption's content is a dict slot -> concept index, or None where the caption does not name that slot.

def render_en_human(concepts, rng):
    words = {s: (LEXICON[s][i].en if i is not None else None) for s, i in concepts.items()}
    np_ = f"{_pick(rng, EN_DET)} {words['subject']}"
    if words['colour']:
        np_ += ' ' + _pick(rng, EN_COLOUR).format(c=words['colour'])
    vp = words['action'] + (' ' + _pick(rng, EN_ADVERBS) if rng.random() < 0.3 else '')
    pp = f"{EN_SCENE_PREP[words['scene']]} the {words['scene']}" if words['scene'] else ''
    text = _tidy(_pick(rng, EN_HUMAN).format(np=np_, vp=vp, pp=pp))
    if rng.random() < 0.15:  # real captions end without punctuation mostly
        text += '.'
    if rng.random() < 0.1:  # real quirk: a run of spaces inside an English caption ("push   ups")
        gaps = [m.start() for m in re.finditer(' ', text)]
        if gaps:
            g = _pick(rng, gaps)
            text = text[:g] + '   ' + text[g + 1:]
    return text


def render_zh_human(concepts, rng):
    s, a, sc, c = (LEXICON[k][concepts[k]].zh if concepts[k] is not None else '' for k in SLOTS)
    text = _pick(rng, ZH_HUMAN).format(
        det=_pick(rng, ZH_DET), s=s, a=a, where=f'在{sc}' if sc else '正在',
        sceneloc=f'{sc}{ZH_SCENE_SUFFIX[sc]}，' if sc else '',
        cpre=_pick(rng, ZH_CPRE).format(c=c) if c else '', cpost=ZH_CPOST.format(c=c) if c else '',
        adv=_pick(rng, ZH_ADVERBS) if rng.random() < 0.3 else '')
    return text + ('。' if rng.random() < 0.5 else '')


def render_en_mt(concepts, rng, scramble):
    """Machine-translation-style English: literal templates, varying case, optional final period."""
    words = {s: (LEXICON[s][i].en if i is not None else None) for s, i in concepts.items()}
    np_ = f"{_pick(rng, EN_MT_DET)} {words['subject']}" if words['subject'] else EN_MT_NO_SUBJECT
    if words['colour']:
        np_ += ' ' + _pick(rng, EN_MT_COLOUR).format(c=words['colour'])
    vp = words['action'] or ''
    pp = f"{EN_SCENE_PREP[words['scene']]} the {words['scene']}" if words['scene'] else ''
    if scramble:
        chunks = [x for x in (np_, vp, pp) if x]
        text = ' '.join(chunks[i] for i in rng.permutation(len(chunks)))
    else:
        text = _tidy(_pick(rng, EN_MT).format(np=np_, vp=vp, pp=pp))
    r = rng.random()
    if r < 0.6:
        text = text[:1].upper() + text[1:]
    elif r < 0.7:
        text = text.upper()
    return text + ('.' if rng.random() < 0.7 else '')


def render_zh_mt(concepts, rng, scramble):
    """Machine-translation-style Chinese: literal word order, optional final full stop."""
    s, a, sc, c = (LEXICON[k][concepts[k]].zh if concepts[k] is not None else '' for k in SLOTS)
    det = _pick(rng, ZH_DET) if s else ''
    cpre = _pick(rng, ZH_CPRE).format(c=c) if c and s else ''
    if not s:  # "someone wearing <c>"
        s = ZH_MT_NO_SUBJECT + (ZH_MT_COLOUR.format(c=c) if c else '')
        c = ''
    place = f'在{sc}' if sc else ''
    if scramble:
        chunks = [x for x in (det + cpre + s, a, place) if x]
        text = ''.join(chunks[i] for i in rng.permutation(len(chunks)))
    else:
        text = _pick(rng, ZH_MT).format(det=det, cpre=cpre, s=s, a=a, place=place, where=place or '正在',
                                        cmt=ZH_MT_COLOUR.format(c=c) if c else '')
    return text + ('。' if rng.random() < 0.3 else '')


def translate(concepts, rng, noise):
    """Noisy MT on concepts: each named concept is, with probability `noise`, dropped (half the time) or
    swapped for another concept of its slot; the output order is scrambled with probability `noise`.
    Returns (concepts, scramble)."""
    out = {}
    for slot in SLOTS:
        i = concepts[slot]
        if i is not None and rng.random() < noise:
            if rng.random() < 0.5:
                i = None
            else:
                i = (i + 1 + int(rng.integers(len(LEXICON[slot]) - 1))) % len(LEXICON[slot])
        out[slot] = i
    return out, bool(rng.random() < noise)


def human_content(video_concepts, rng):
    """What one human caption names: all essential slots, and at most one non-essential slot left out."""
    content = dict(video_concepts)
    if rng.random() < 0.4:
        content[_pick(rng, [s for s in SLOTS if s not in ESSENTIAL_SLOTS])] = None
    return content


# ============ video plan and features ============
Video = namedtuple('Video', 'split index vid concepts nframes')


def _video_id(rng):
    alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
    core = ''.join(_pick(rng, alphabet) for _ in range(10))
    cut = int(rng.integers(1, 10))
    start = int(rng.integers(0, 300))
    # a '-' inside the YouTube-like part and '_' both inside the id and before the frame number (docs/data.md, 'video2frames')
    return f'{core[:cut]}-{core[cut:]}_{start:06d}_{start + 10:06d}'


def plan_videos(seed=0, n_train=400, n_val=60, n_test=100):
    """The videos of every split: ids, concept indices (slot -> index into LEXICON[slot]) and frame counts.

    Deterministic in (seed, split sizes). Most videos have 8-40 frames; max(1, 5%) per split have 70-90, so the
    64-frame cap (docs/data.md, 'Video batches') is exercised. Returns a list of `Video`, train then val then test.
    """
    videos, seen = [], set()
    for split_no, (split, n) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
        rng = np.random.default_rng([seed, 0, split_no])
        n_long = max(1, round(0.05 * n))
        long_ones = set(rng.choice(n, size=n_long, replace=False).tolist())
        for i in range(n):
            vid = _video_id(rng)
            while vid in seen:
                vid = _video_id(rng)
            seen.add(vid)
            concepts = {s: int(rng.integers(len(LEXICON[s]))) for s in SLOTS}
            nframes = int(rng.integers(70, 91)) if i in long_ones else int(rng.integers(8, 41))
            videos.append(Video(split, i, vid, concepts, nframes))
    return videos


def concept_directions(seed, dim):
    """slot -> (n_concepts, dim) float64 directions, i.i.d. N(0, 1) per element."""
    rng = np.random.default_rng([seed, 1])
    return {s: rng.standard_normal((len(LEXICON[s]), dim)) for s in SLOTS}


def video_frames(video, directions, seed, feature_noise):
    """(nframes, dim) float32 features of one video.

    frame_t = sum_slot w_slot d[slot, c_slot] + 0.5 w_action sin(2 pi f t / n + phi) d[action, c_action]
              + noise_t,   noise_t ~ N(0, feature_noise^2) per element,
    with f in [1, 3) and phi in [0, 2 pi) drawn per video: the action pulses over time like a repeated motion.
    """
    rng = np.random.default_rng([seed, 2, SPLITS.index(video.split), video.index])
    base = sum(SLOT_WEIGHTS[s] * directions[s][video.concepts[s]] for s in SLOTS)  # (dim,)
    t = np.arange(video.nframes)
    freq, phase = rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
    pulse = 0.5 * SLOT_WEIGHTS['action'] * np.sin(2 * np.pi * freq * t / video.nframes + phase)  # (n,)
    action = directions['action'][video.concepts['action']]
    noise = feature_noise * rng.standard_normal((video.nframes, base.shape[0]))
    return (base[None] + pulse[:, None] * action[None] + noise).astype(np.float32)


# ============ caption files ============

def caption_files(collection):
    """(split, tag) -> caption file name, as docs/data.md names them."""
    c = collection
    names = {('train', 'enc'): f'{c}train.caption.txt',
             ('train', 'enc2zh'): f'{c}train_google_enc2zh.caption.txt',
             ('train', 'enc2zh2enc'): f'{c}train_google_enc2zh2enc.caption.txt',
             ('train', 'zh'): f'{c}train_zh.caption.txt',
             ('train', 'zhc2en'): f'{c}train_google_zhc2en.caption.txt'}
    for split in ('val', 'test'):
        names[(split, 'enc')] = f'{c}{split}.caption.txt'
        names[(split, 'zh')] = f'{c}{split}_zh.caption.txt'
        names[(split, 'zh2enc')] = f'{c}{split}_google_zh2enc.caption.txt'
        names[(split, 'enc2zh')] = f'{c}{split}_google_enc2zh.caption.txt'
    return names


def make_captions(videos, seed, captions_per_video, mt_noise):
    """(split, tag) -> list of (cap_id, text) lines in file order.

    English-side files (enc, enc2zh, enc2zh2enc) list videos in plan order; Chinese-side files (zh and the MT
    made from it) in a shuffled order per split, as in the real VATEX files (docs/data.md). Human and MT text
    come from separate random streams, so `mt_noise` changes only the MT files.
    """
    lines = {}
    for split_no, split in enumerate(SPLITS):
        vids = [v for v in videos if v.split == split]
        zh_order = np.random.default_rng([seed, 3, split_no]).permutation(len(vids))
        per_video = {}
        for v in vids:
            human = np.random.default_rng([seed, 4, split_no, v.index])
            mt = np.random.default_rng([seed, 5, split_no, v.index])
            rows = {}
            for k in range(captions_per_video):
                # the Chinese caption k is written independently of the English caption k
                en_c, zh_c = human_content(v.concepts, human), human_content(v.concepts, human)
                rows[('enc', k)] = render_en_human(en_c, human)
                rows[('zh', k)] = render_zh_human(zh_c, human)
                mt_c, scramble = translate(en_c, mt, mt_noise)
                rows[('enc2zh', k)] = render_zh_mt(mt_c, mt, scramble)
                zh2en_c, scramble = translate(zh_c, mt, mt_noise)
                rows[('zhc2en' if split == 'train' else 'zh2enc', k)] = render_en_mt(zh2en_c, mt, scramble)
                if split == 'train':  # back-translation: noisy MT of the (already noisy) MT
                    back_c, scramble = translate(mt_c, mt, mt_noise)
                    rows[('enc2zh2enc', k)] = render_en_mt(back_c, mt, scramble)
            per_video[v.vid] = rows
        tags = {tag for (s, tag) in caption_files('x') if s == split}
        for tag in tags:
            order = [vids[i] for i in zh_order] if tag in ('zh', 'zhc2en', 'zh2enc') else vids
            lines[(split, tag)] = [(f'{v.vid}#{tag}#{k}', per_video[v.vid][(tag, k)])
                                   for v in order for k in range(captions_per_video)]
    return lines


def _write_caption_file(path, rows, tag):
    newline = '\r\n' if tag == 'enc2zh' else '\n'  # real quirk: the google_enc2zh files use CRLF
    text = newline.join(f'{cap_id} {txt}' for cap_id, txt in rows)
    if tag != 'zh':  # real quirk: the human Chinese files have no final newline
        text += newline
    with open(path, 'w', encoding='utf-8', newline='') as f:
        f.write(text)


# ============ tiny BERT ============

def build_vocab():
    """WordPiece vocabulary that covers every caption the generator can write, with mBERT's special ids:
    [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103 (docs/data.md, 'Tokenizer')."""
    specials = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    punct = list('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~') + list('，。！？、：；')
    en_text = ' '.join([c.en for s in SLOTS for c in LEXICON[s]] + list(EN_SCENE_PREP.values())
                       + list(EN_HUMAN + EN_COLOUR + EN_DET + EN_ADVERBS + EN_MT + EN_MT_COLOUR + EN_MT_DET)
                       + ['the', EN_MT_NO_SUBJECT])  # 'the' of the scene phrase
    en_words = sorted(set(re.findall(r'[a-z]+', re.sub(r'\{\w+\}', ' ', en_text.lower()))))
    zh_text = ''.join([c.zh for s in SLOTS for c in LEXICON[s]] + list(ZH_SCENE_SUFFIX.values())
                      + list(ZH_HUMAN + ZH_DET + ZH_CPRE + ZH_ADVERBS + ZH_MT)
                      + [ZH_CPOST, ZH_MT_COLOUR, ZH_MT_NO_SUBJECT, '在正在'])  # {where} values
    zh_chars = sorted(set(re.findall(r'[\u4e00-\u9fff]', re.sub(r'\{\w+\}', '', zh_text))))
    digits = list('0123456789')
    pieces = ['##s', '##ing', '##ed', '##er', '##ly', '##es']
    vocab = specials + punct + en_words + zh_chars + digits + pieces
    assert len(set(vocab)) == len(vocab), 'duplicate vocabulary entry'
    return vocab


def write_tiny_bert(bert_dir, seed=0, hidden=64, layers=12, vocab=None):
    """A randomly initialised BertModel + vocab.txt that `from_pretrained(bert_dir)` loads offline.

    12 layers by default so the reference layer lists (layer.5 .. layer.11) still name the top layers.
    `vocab` defaults to the video toy's (`build_vocab()`).
    """
    import torch
    from transformers import BertConfig, BertModel

    vocab = vocab or build_vocab()
    os.makedirs(bert_dir, exist_ok=True)
    with open(os.path.join(bert_dir, 'vocab.txt'), 'w', encoding='utf-8', newline='\n') as f:
        f.write('\n'.join(vocab) + '\n')
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(bert_dir)
    return sorted(os.path.join(bert_dir, x) for x in os.listdir(bert_dir))


# ============ the whole collection ============

def make_toy_collection(root, collection='toy', *, n_train=400, n_val=60, n_test=100, captions_per_video=5,
                        dim=128, feature_noise=1.0, mt_noise=0.3, seed=0, bert_hidden=64, bert_layers=12,
                        overwrite=False):
    """Write the toy collection `root/collection` and the tiny BERT `root/tiny_bert`.

    Each of the two folders is left alone when it exists, unless `overwrite`. Returns a dict of paths:
    collection_dir, feature_dir, text_dir, bert_dir, captions ({(split, tag): path}), and
    written ({'collection': bool, 'bert': bool}) saying which of the two folders this call wrote.
    """
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_-]*', collection):
        raise ValueError(f'collection {collection!r}: use letters, digits, "_" or "-" (it prefixes file names)')
    for name, value in dict(n_train=n_train, n_val=n_val, n_test=n_test, captions_per_video=captions_per_video,
                            dim=dim, bert_hidden=bert_hidden, bert_layers=bert_layers).items():
        if value < 1:
            raise ValueError(f'{name} must be >= 1, got {value}')
    if not 0.0 <= mt_noise <= 1.0 or feature_noise < 0:
        raise ValueError(f'need 0 <= mt_noise <= 1 and feature_noise >= 0, got {mt_noise}, {feature_noise}')
    if bert_hidden % 4:
        raise ValueError(f'bert_hidden must be a multiple of the 4 attention heads, got {bert_hidden}')

    coll_dir = os.path.join(root, collection)
    feature_dir = os.path.join(coll_dir, 'FeatureData', FEATURE_NAME)
    text_dir = os.path.join(coll_dir, 'TextData')
    bert_dir = os.path.join(root, BERT_DIR_NAME)
    files = caption_files(collection)
    out = dict(collection_dir=coll_dir, feature_dir=feature_dir, text_dir=text_dir, bert_dir=bert_dir,
               captions={key: os.path.join(text_dir, name) for key, name in files.items()},
               written={'collection': False, 'bert': False})

    if overwrite or not os.path.exists(coll_dir):
        videos = plan_videos(seed, n_train, n_val, n_test)
        captions = make_captions(videos, seed, captions_per_video, mt_noise)

        def write_collection(tmp):
            # features: every frame of every split in one BigFile, rows shuffled so that nothing may rely on
            # frames being stored in order (readers must sort by int(frame_no), docs/data.md)
            fdir = os.path.join(tmp, 'FeatureData', FEATURE_NAME)
            directions = concept_directions(seed, dim)
            names = [f'{v.vid}_{n}' for v in videos for n in range(v.nframes)]
            feats = np.concatenate([video_frames(v, directions, seed, feature_noise) for v in videos])  # (rows, dim)
            rows = np.random.default_rng([seed, 6]).permutation(len(names))
            write_bigfile(fdir, [names[i] for i in rows], feats[rows])
            with open(os.path.join(fdir, 'video2frames.txt'), 'w', encoding='utf-8', newline='\n') as f:
                f.write('{' + ',\n '.join(f'{v.vid!r}: {[f"{v.vid}_{n}" for n in range(v.nframes)]!r}'
                                          for v in videos) + '}\n')
            os.makedirs(os.path.join(tmp, 'TextData'))
            for (split, tag), lines in captions.items():
                _write_caption_file(os.path.join(tmp, 'TextData', files[(split, tag)]), lines, tag)

        _build_then_replace(coll_dir, write_collection)
        out['written']['collection'] = True

    if overwrite or not os.path.exists(bert_dir):
        _build_then_replace(bert_dir, lambda tmp: write_tiny_bert(tmp, seed, bert_hidden, bert_layers))
        out['written']['bert'] = True
    return out


def _build_then_replace(final_dir, build):
    """Build into a sibling temporary folder and move it into place, so an interrupted run never leaves a
    half-written folder that a later run would take as complete."""
    tmp = final_dir + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


# ============ the toy image collection (Multi-30K-style naming, task 1) ============
# Three target languages; each concept of LEXICON has a word (or phrase) per language, in LEXICON's order.
IMAGE_FEATURE_NAME = 'toy_clip'
IMAGE_BERT_DIR_NAME = 'tiny_bert_img'
IMAGE_LANGUAGES = ('de', 'fr', 'cs')
IMG_LEXICON = {
    'de': dict(
        subject=('Mann', 'Frau', 'Junge', 'Mädchen', 'Koch', 'Tänzer', 'Hund', 'Katze', 'Bauer', 'Student',
                 'Soldat', 'Jugendlicher'),
        action=('läuft', 'springt', 'tanzt', 'kocht', 'schwimmt', 'singt', 'spielt Gitarre', 'fährt Fahrrad',
                'malt', 'liest ein Buch', 'klettert', 'wirft einen Ball'),
        scene=('im Park', 'in der Küche', 'am Strand', 'auf der Straße', 'im Fitnessstudio', 'im Klassenzimmer',
               'im Wald', 'auf der Bühne', 'am See', 'im Garten', 'im Büro', 'im Schnee'),
        colour=('Rot', 'Blau', 'Grün', 'Gelb', 'Schwarz', 'Weiß'),
        colour_phrase=('in {c}', 'ganz in {c}'), det=('ein', 'der', 'dieser', ''),
        human=('{d} {s} {c} {a} {p}', 'ein Bild: {d} {s} {c} {a} {p}', '{p} {a} {d} {s} {c}',
               'hier {a} {d} {s} {c} {p}'),
        mt=('{d} {s} {c} {a} {p}', '{s} {a} {p} {c}'), nobody='jemand'),
    'fr': dict(
        subject=('homme', 'femme', 'garçon', 'fille', 'cuisinier', 'danseur', 'chien', 'chat', 'fermier',
                 'étudiant', 'soldat', 'adolescent'),
        action=('court', 'saute', 'danse', 'cuisine', 'nage', 'chante', 'joue de la guitare', 'fait du vélo',
                'peint', 'lit un livre', 'grimpe', 'lance une balle'),
        scene=('dans le parc', 'dans la cuisine', 'sur la plage', 'dans la rue', 'à la salle de sport',
               'dans la classe', 'dans la forêt', 'sur la scène', 'au bord du lac', 'dans le jardin',
               'au bureau', 'dans la neige'),
        colour=('rouge', 'bleu', 'vert', 'jaune', 'noir', 'blanc'),
        colour_phrase=('en {c}', 'habillé en {c}'), det=('un', 'le', 'ce', ''),
        human=('{d} {s} {c} {a} {p}', 'une photo : {d} {s} {c} {a} {p}', '{p} , {d} {s} {c} {a}',
               'voici {d} {s} {c} qui {a} {p}'),
        mt=('{d} {s} {c} {a} {p}', '{s} {a} {p} {c}'), nobody="quelqu'un"),
    'cs': dict(
        subject=('muž', 'žena', 'chlapec', 'dívka', 'kuchař', 'tanečník', 'pes', 'kočka', 'farmář', 'student',
                 'voják', 'mladík'),
        action=('běží', 'skáče', 'tančí', 'vaří', 'plave', 'zpívá', 'hraje na kytaru', 'jede na kole', 'maluje',
                'čte knihu', 'leze', 'hází míč'),
        scene=('v parku', 'v kuchyni', 'na pláži', 'na ulici', 'v posilovně', 've třídě', 'v lese', 'na pódiu',
               'u jezera', 'na zahradě', 'v kanceláři', 'na sněhu'),
        colour=('červeně', 'modře', 'zeleně', 'žlutě', 'černě', 'bíle'),
        colour_phrase=('oblečený {c}', 'celý {c}'), det=('jeden', 'ten', ''),
        human=('{d} {s} {c} {a} {p}', 'na obrázku {d} {s} {c} {a} {p}', '{p} {a} {d} {s} {c}',
               'tady {d} {s} {c} {a} {p}'),
        mt=('{d} {s} {c} {a} {p}', '{s} {a} {p} {c}'), nobody='někdo'),
}


def render_lang(lang, concepts, rng, mt=False, scramble=False):
    """A caption in one of the toy image languages; `mt` uses the literal MT templates."""
    lex = IMG_LEXICON[lang]
    words = {s: (lex[s][i] if i is not None else '') for s, i in concepts.items()}
    subject = words['subject'] or lex['nobody']
    colour = _pick(rng, lex['colour_phrase']).format(c=words['colour']) if words['colour'] else ''
    det = _pick(rng, lex['det']) if words['subject'] else ''
    if scramble:
        chunks = [x for x in (f'{det} {subject} {colour}', words['action'], words['scene']) if x.strip()]
        text = ' '.join(chunks[i] for i in rng.permutation(len(chunks)))
    else:
        text = _pick(rng, lex['mt'] if mt else lex['human']).format(d=det, s=subject, c=colour,
                                                                   a=words['action'], p=words['scene'])
    text = _tidy(text)
    text = text[:1].upper() + text[1:]
    return text + ('.' if rng.random() < (0.7 if mt else 0.4) else '')


def build_image_vocab(languages=IMAGE_LANGUAGES):
    """The video toy's vocabulary plus every word the toy image captions can contain, written as the
    lower-casing, accent-stripping mBERT tokenizer sees them."""
    import unicodedata

    def normalise(word):
        return ''.join(ch for ch in unicodedata.normalize('NFD', word.lower()) if unicodedata.category(ch) != 'Mn')
    vocab = build_vocab()
    known = set(vocab)
    for lang in languages:
        lex = IMG_LEXICON[lang]
        text = ' '.join([w for slot in SLOTS for w in lex[slot]] + list(lex['colour_phrase'] + lex['det'] +
                                                                        lex['human'] + lex['mt']) + [lex['nobody']])
        for word in re.findall(r"[^\W\d_]+", re.sub(r'\{\w+\}', ' ', text)):
            w = normalise(word)
            if w not in known:
                known.add(w)
                vocab.append(w)
    return vocab


def plan_images(seed=0, n_train=400, n_val=60, n_test=100):
    """[(split, index, image id, concepts)] with unique Flickr-like numeric ids, train then val then test."""
    out, seen = [], set()
    for split_no, (split, n) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
        rng = np.random.default_rng([seed, 10, split_no])
        for i in range(n):
            image_id = str(int(rng.integers(10 ** 8, 10 ** 10)))
            while image_id in seen:
                image_id = str(int(rng.integers(10 ** 8, 10 ** 10)))
            seen.add(image_id)
            out.append(Video(split, i, image_id, {s: int(rng.integers(len(LEXICON[s]))) for s in SLOTS}, 1))
    return out


def image_feature(image, directions, seed, feature_noise):
    """(dim,) float32 CLIP-like feature: sum_slot w_slot d[slot, c_slot] + N(0, feature_noise^2) noise."""
    rng = np.random.default_rng([seed, 11, SPLITS.index(image.split), image.index])
    base = sum(SLOT_WEIGHTS[s] * directions[s][image.concepts[s]] for s in SLOTS)
    return (base + feature_noise * rng.standard_normal(base.shape[0])).astype(np.float32)


def image_caption_lines(images, seed, captions_per_image, mt_noise, languages, collection):
    """{file name: [(cap_id, text)]} for every caption file NRCCR reads, named as basic/paths.py names them."""
    from basic import paths
    files = {}
    for split_no, split in enumerate(SPLITS):
        imgs = [im for im in images if im.split == split]
        for lang in languages:
            data_type = f'google_enc2{lang}'
            streams = {s.role: s.candidates[0] for s in paths.image_streams(collection, split, data_type, 1)}
            for name in streams.values():
                files.setdefault(name, [])
            lang_no = IMAGE_LANGUAGES.index(lang) if lang in IMAGE_LANGUAGES else len(IMAGE_LANGUAGES)
            for im in imgs:
                human = np.random.default_rng([seed, 12, split_no, im.index])      # the same English everywhere
                target = np.random.default_rng([seed, 13, split_no, im.index, lang_no])
                mt = np.random.default_rng([seed, 14, split_no, im.index, lang_no])
                for k in range(captions_per_image):
                    en_c = human_content(im.concepts, human)
                    en_text = render_en_human(en_c, human)
                    cid = f'{im.vid}.jpg#{{}}#{k}'
                    if split == 'train':
                        if lang == languages[0]:
                            files[streams['src']].append((cid.format('enc'), en_text))
                        tr_c, scramble = translate(en_c, mt, mt_noise)
                        files[streams['tr']].append((cid.format(f'enc2{lang}'), render_lang(lang, tr_c, mt, True,
                                                                                            scramble)))
                        bt_c, scramble = translate(tr_c, mt, mt_noise)
                        files[streams['bt']].append((cid.format(f'enc2{lang}2enc'), render_en_mt(bt_c, mt, scramble)))
                    else:
                        xx_c = human_content(im.concepts, target)
                        files[streams['second']].append((cid.format(lang), render_lang(lang, xx_c, target)))
                        back_c, scramble = translate(xx_c, mt, mt_noise)
                        files[streams['primary']].append((cid.format(f'{lang}2enc'), render_en_mt(back_c, mt,
                                                                                                  scramble)))
    return files


def make_toy_image_collection(root, collection='toyimg', *, n_train=400, n_val=60, n_test=100, captions_per_image=3,
                              dim=512, feature_noise=1.0, mt_noise=0.3, languages=IMAGE_LANGUAGES, seed=0,
                              bert_hidden=64, bert_layers=12, overwrite=False):
    """Write the toy image collection `root/collection` (Multi-30K task 1 naming, one CLIP-like feature per
    image in the released `.npy` layout) and its tiny BERT `root/tiny_bert_img`.

    Every image has `captions_per_image` English captions and, per target language xx, their machine
    translations (enc2xx) and back-translations (enc2xx2enc) for training; validation and test images have
    human xx captions (written independently of the English ones) and their noisy MT into English (xx2enc).
    Returns the same kind of dict as make_toy_collection."""
    from basic import paths
    for name, value in dict(n_train=n_train, n_val=n_val, n_test=n_test, captions_per_image=captions_per_image,
                            dim=dim, bert_hidden=bert_hidden, bert_layers=bert_layers).items():
        if value < 1:
            raise ValueError(f'{name} must be >= 1, got {value}')
    unknown = [x for x in languages if x not in IMG_LEXICON]
    if unknown or not languages:
        raise ValueError(f'languages must be some of {", ".join(IMG_LEXICON)}, got {", ".join(languages) or "none"}')
    if not 0.0 <= mt_noise <= 1.0 or feature_noise < 0:
        raise ValueError(f'need 0 <= mt_noise <= 1 and feature_noise >= 0, got {mt_noise}, {feature_noise}')
    coll_dir = os.path.join(root, collection)
    feature_dir = paths.feature_dir(root, collection, IMAGE_FEATURE_NAME)
    bert_dir = os.path.join(root, IMAGE_BERT_DIR_NAME)
    out = dict(collection_dir=coll_dir, feature_dir=feature_dir, text_dir=paths.text_dir(root, collection),
               bert_dir=bert_dir, written={'collection': False, 'bert': False}, languages=tuple(languages),
               feature=IMAGE_FEATURE_NAME)
    out['captions'] = {s.candidates[0]: os.path.join(out['text_dir'], s.candidates[0])
                       for lang in languages for split in SPLITS
                       for s in paths.image_streams(collection, split, f'google_enc2{lang}', 1)}

    if overwrite or not os.path.exists(coll_dir):
        images = plan_images(seed, n_train, n_val, n_test)
        lines = image_caption_lines(images, seed, captions_per_image, mt_noise, tuple(languages), collection)

        def write_collection(tmp):
            directions = concept_directions(seed, dim)
            for split in SPLITS:
                imgs = [im for im in images if im.split == split]
                # id files list images in another order than the captions, as nothing may rely on it
                order = np.random.default_rng([seed, 15, SPLITS.index(split)]).permutation(len(imgs))
                id_file = paths.image_id_file(tmp, '', split, IMAGE_FEATURE_NAME)
                npy = paths.image_npy_candidates(tmp, '', split, IMAGE_FEATURE_NAME)[0]
                os.makedirs(os.path.dirname(npy), exist_ok=True)
                with open(id_file, 'w', newline='\n') as f:
                    f.write(''.join(f'{imgs[i].vid}\n' for i in order))
                np.save(npy, np.stack([image_feature(imgs[i], directions, seed, feature_noise) for i in order]))
            text = os.path.join(tmp, 'TextData')
            os.makedirs(text)
            for name, rows in lines.items():
                with open(os.path.join(text, name), 'w', encoding='utf-8', newline='\n') as f:
                    f.write(''.join(f'{cap_id} {t}\n' for cap_id, t in rows))

        _build_then_replace(coll_dir, write_collection)
        out['written']['collection'] = True

    if overwrite or not os.path.exists(bert_dir):
        vocab = build_image_vocab()
        _build_then_replace(bert_dir, lambda tmp: write_tiny_bert(tmp, seed, bert_hidden, bert_layers, vocab))
        out['written']['bert'] = True
    return out


def is_image_toy(collection):
    return collection.startswith('toyimg')


def get_args_parser():
    p = argparse.ArgumentParser('make_toy_data', description=__doc__.split('\n')[0])
    g = p.add_argument_group('Where')
    g.add_argument('--root', required=True, help='VisualSearch-style root to write into')
    g.add_argument('--collection', default='toy',
                   help='collection name, also the caption-file prefix (default toy); a name starting with toyimg '
                        'makes the toy image collection (Multi-30K naming, tiny BERT in ROOT/tiny_bert_img)')
    g.add_argument('--overwrite', action='store_true', help='rewrite folders that already exist')
    g = p.add_argument_group('Sizes')
    g.add_argument('--n_train', type=int, default=400, help='training videos (default 400)')
    g.add_argument('--n_val', type=int, default=60, help='validation videos (default 60)')
    g.add_argument('--n_test', type=int, default=100, help='test videos (default 100)')
    g.add_argument('--captions_per_video', type=int, default=None,
                   help='captions per video (image) per file (default 5, images 3; VATEX has 10)')
    g.add_argument('--dim', type=int, default=None,
                   help='feature dims (default 128, images 512 as CLIP ViT-B/32; VATEX i3d has 1024)')
    g.add_argument('--languages', nargs='+', default=list(IMAGE_LANGUAGES),
                   help=f'toy image collection only: target languages (default {" ".join(IMAGE_LANGUAGES)})')
    g = p.add_argument_group('Difficulty')
    g.add_argument('--feature_noise', type=float, default=1.0,
                   help='per-element std of frame noise; concept directions have unit per-element variance (default 1.0)')
    g.add_argument('--mt_noise', type=float, default=0.3,
                   help='per-concept probability that a machine translation drops or swaps it, and probability of '
                        'scrambled order (default 0.3)')
    g.add_argument('--seed', type=int, default=0, help='same seed, byte-identical files (default 0)')
    g = p.add_argument_group('Tiny BERT')
    g.add_argument('--bert_hidden', type=int, default=64, help='hidden size, multiple of 4 heads (default 64; mBERT 768)')
    g.add_argument('--bert_layers', type=int, default=12, help='layers (default 12, as mBERT, so layer.5..11 exist)')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = time.time()
    kwargs = {k: v for k, v in vars(args).items() if k not in ('root', 'collection', 'languages') and v is not None}
    try:
        if is_image_toy(args.collection):
            if 'captions_per_video' in kwargs:
                kwargs['captions_per_image'] = kwargs.pop('captions_per_video')
            out = make_toy_image_collection(args.root, args.collection, languages=tuple(args.languages), **kwargs)
        else:
            out = make_toy_collection(args.root, args.collection, **kwargs)
    except ValueError as e:
        sys.exit(f'make_toy_data: {e}')
    for key, path in (('collection', out['collection_dir']), ('bert', out['bert_dir'])):
        if out['written'][key]:
            print(f'wrote {path}')
            if key == 'collection':
                print(f'  features  {out["feature_dir"]}')
                for p in sorted(set(out['captions'].values()) if 'captions' in out else []):
                    print(f'  captions  {p}')
        else:
            print(f'{path} exists, left alone (pass --overwrite to rebuild it)')
    print(f'done in {time.time() - start:.1f}s')
    return out


if __name__ == '__main__':
    main()
