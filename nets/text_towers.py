"""Text towers of the multilingual CLIP model (nets/mclip.py; docs/models.md, 'Multilingual CLIP'), each loaded
with its own library, and the tokenizers that go with them.

A tower is told apart by the files of its folder (or of its hub repository):

    sentence-transformers  `modules.json`: loaded with sentence-transformers itself (an optional package) and run
                           module by module as it is (Transformer, Pooling, Dense, ...), so an embedding is
                           `SentenceTransformer(folder).encode(text)`; e.g.
                           sentence-transformers/clip-ViT-B-32-multilingual-v1 (50+ languages, aligned to
                           openai/clip-vit-base-patch32).
    clip                   `config.json` of model_type 'clip': transformers' `CLIPModel`, its text tower and text
                           projection (`CLIPModel.get_text_features`); English.
    encoder                any other transformers encoder (`config.json`): `AutoModel`, masked mean over the
                           tokens; aligned to no CLIP, so the model adds a learned projection (training only).

Each tower maps (ids (B, L), mask (B, L)) to (B, dim) and says which CLIP it is aligned to (`aligned_to`, an
identity as basic/clip_encoder.py `clip_identity` writes it, or None when unknown): a CLIP tower is its own CLIP;
a sentence-transformers folder names its CLIP in `aligned_clip.json` (written by whoever aligned it) or, for the
published models, in KNOWN_ALIGNMENTS.

Tokenizers (`tower_tokenizer`) give the token ids of texts exactly as the tower's library would feed them (the
sentence-transformers preprocessing with its truncation to max_seq_length; the transformers tokenizer truncated
to the model's positions), as int32 arrays without padding: basic/data_provider.tokenize reads them.
"""
import functools
import json
import logging
import os

import numpy as np
import torch
import torch.nn as nn

from basic.clip_encoder import clip_identity, looks_local
from basic.errors import DataError
from nets.common import pool, quiet_transformers

logger = logging.getLogger(__name__)

ST_FORMAT, CLIP_FORMAT, ENCODER_FORMAT = 'sentence-transformers', 'clip', 'encoder'
DEFAULT_TEXT_MODEL = 'sentence-transformers/clip-ViT-B-32-multilingual-v1'
ALIGNMENT_FILE = 'aligned_clip.json'
# Published sentence-transformers towers and the CLIP whose image embeddings they were distilled into.
KNOWN_ALIGNMENTS = {'sentence-transformers/clip-ViT-B-32-multilingual-v1': ('openai/clip-vit-base-patch32', 512)}
INSTALL_ST = 'pip install sentence-transformers (see requirements-optional.txt)'


def require_sentence_transformers():
    try:
        import sentence_transformers
    except ImportError:
        raise DataError(f'sentence-transformers text models need the sentence-transformers package: {INSTALL_ST}') \
            from None
    return sentence_transformers


# ============ which format ============

def _hub_file(name, filename):
    """Local path of `filename` in hub repository `name` (downloaded or cached), or None when it has none."""
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(name, filename)
    except Exception:       # not found, offline and not cached, no such repository: the caller decides
        return None


def tower_format(name):
    """'sentence-transformers', 'clip' or 'encoder' for a folder or hub id; DataError (one line) otherwise."""
    if looks_local(name):
        if not os.path.isdir(name):
            raise DataError(f'{name}: no such text model folder; give a sentence-transformers folder, a CLIP folder '
                            f'or a transformers model folder (or a hub id such as {DEFAULT_TEXT_MODEL})')
        modules, config = os.path.join(name, 'modules.json'), os.path.join(name, 'config.json')
        if not os.path.isfile(config):
            config = None
    else:
        modules, config = _hub_file(name, 'modules.json'), _hub_file(name, 'config.json')
        if modules is None and config is None:
            raise DataError(f'{name}: could not find this text model (no modules.json or config.json on the hub, or '
                            'no network); download it once with network access, or pass a local folder')
    if modules and os.path.isfile(modules):
        return ST_FORMAT
    if not config:
        raise DataError(f'{name}: neither a sentence-transformers folder (modules.json) nor a transformers model '
                        '(config.json); save the model with SentenceTransformer.save or save_pretrained')
    with open(config) as f:
        model_type = json.load(f).get('model_type', '')
    if model_type == 'clip':
        return CLIP_FORMAT
    if model_type.startswith('clip'):
        raise DataError(f'{name}: a CLIP {model_type} without a text tower; give the full CLIP model (e.g. '
                        'openai/clip-vit-base-patch32) or a multilingual sentence-transformers CLIP text model')
    return ENCODER_FORMAT


def st_alignment(name, dim):
    """The CLIP a sentence-transformers tower is aligned to: its folder's aligned_clip.json, else the published
    models' table, else None."""
    path = os.path.join(name, ALIGNMENT_FILE) if looks_local(name) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    key = name.rstrip('/')
    key = key if key in KNOWN_ALIGNMENTS else f'sentence-transformers/{key}'
    if key in KNOWN_ALIGNMENTS:
        clip, clip_dim = KNOWN_ALIGNMENTS[key]
        return {'clip': clip, 'dim': clip_dim, 'fingerprint': None}
    return None


def write_alignment(folder, identity):
    """Record in a sentence-transformers folder which CLIP it is aligned to (basic/clip_encoder.clip_identity)."""
    with open(os.path.join(folder, ALIGNMENT_FILE), 'w') as f:
        json.dump(identity, f, indent=1)


# ============ towers ============

class SentenceTransformerTower(nn.Module):
    """A sentence-transformers model run module by module on our token batches: `sentence_embedding`.
    Every tower has `dim`, `pad_id`, `aligned_to`, `unused_parameters()` and forward(ids, mask) -> (B, dim)."""

    def __init__(self, name):
        st = require_sentence_transformers()
        quiet_transformers()
        try:
            self_st = st.SentenceTransformer(name, device='cpu')
        except (OSError, ValueError) as e:
            raise DataError(f'{name}: could not load the sentence-transformers model ({str(e).splitlines()[0]}); '
                            'download it once with network access, or pass a local folder') from None
        super().__init__()
        self.st = self_st
        dim_of = getattr(self_st, 'get_embedding_dimension', None) or self_st.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.token_types = 'token_type_ids' in getattr(self_st.tokenizer, 'model_input_names', ())
        self.pad_id = self_st.tokenizer.pad_token_id or 0
        self.aligned_to = st_alignment(name, self.dim)

    def unused_parameters(self):
        """The transformer's pooling head (BERT's `pooler`): sentence-transformers pools the token states, so
        it gets no gradient (DDP needs every trained parameter to get one)."""
        return [p for n, p in self.named_parameters() if '.pooler.' in f'.{n}']

    def forward(self, ids, mask):
        features = {'input_ids': ids, 'attention_mask': mask}
        if self.token_types:
            features['token_type_ids'] = torch.zeros_like(ids)
        return self.st(features)['sentence_embedding']


class ClipTextTower(nn.Module):
    """transformers' CLIPModel, text side: text tower + text projection (= `CLIPModel.get_text_features`)."""

    def __init__(self, name):
        from transformers import CLIPModel
        quiet_transformers()
        try:
            clip = CLIPModel.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise DataError(f'{name}: could not load CLIP ({str(e).splitlines()[0]}); download it once with '
                            'network access, or pass a local folder') from None
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection
        self.dim = int(clip.config.projection_dim)
        self.pad_id = clip.config.text_config.pad_token_id or 0
        self.aligned_to = clip_identity(name, clip.visual_projection)

    def unused_parameters(self):
        return []

    def forward(self, ids, mask):
        return self.text_projection(self.text_model(input_ids=ids, attention_mask=mask).pooler_output)


class EncoderTower(nn.Module):
    """Any transformers encoder (AutoModel, no pooling head), masked mean over its last hidden states. Built from
    `config` (a config dict: offline, the weights come from a checkpoint) or loaded from `name`."""

    def __init__(self, name, config=None):
        from transformers import AutoConfig, AutoModel
        quiet_transformers()
        super().__init__()
        try:
            if config:
                hf_config = AutoConfig.for_model(**config)
                self.encoder = _without_pooler(lambda **kw: AutoModel.from_config(hf_config, **kw))
            else:
                self.encoder = _without_pooler(lambda **kw: AutoModel.from_pretrained(name, **kw))
        except (OSError, ValueError) as e:
            raise DataError(f'{name}: could not load the text encoder ({str(e).splitlines()[0]}); download it once '
                            'with network access, or pass a local folder') from None
        self.dim = int(self.encoder.config.hidden_size)
        self.pad_id = getattr(self.encoder.config, 'pad_token_id', None) or 0
        self.aligned_to = None

    def unused_parameters(self):
        return []

    def forward(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state     # (B, L, H)
        return pool(hidden, mask, masked=True)


def _without_pooler(load):
    """BERT-like encoders without their pooling head (it would get no gradient); others as they come."""
    try:
        return load(add_pooling_layer=False)
    except TypeError:
        return load()


def load_tower(name, fmt, config=None):
    """The tower of format `fmt`. Loading leaves the global RNG as it was (a library may initialise weights
    before loading them), so what is built after it starts from the same random state however it loads."""
    with torch.random.fork_rng(devices=[]):
        if fmt == ST_FORMAT:
            return SentenceTransformerTower(name)
        if fmt == CLIP_FORMAT:
            return ClipTextTower(name)
        return EncoderTower(name, config)


# ============ tokenizers ============

class TowerTokenizer:
    """Token ids of texts as the tower's own library feeds them: `token_ids(texts)` -> [int32 array], no padding.
    `mask_token_id` / `pad_token_id` as the underlying tokenizer has them."""

    def __init__(self, name, fmt):
        quiet_transformers()
        self.name, self.format = name, fmt
        if fmt == ST_FORMAT:
            st = require_sentence_transformers().SentenceTransformer(name, device='cpu')
            st.to('meta')                 # only the preprocessing is used: the weights need no memory
            self._st, tokenizer = st, st.tokenizer
        else:
            from transformers import AutoConfig, AutoTokenizer
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
                config = AutoConfig.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise DataError(f'{name}: could not load its tokenizer ({str(e).splitlines()[0]})') from None
            config = getattr(config, 'text_config', config)
            self.max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id or 0
        self.mask_token_id = tokenizer.mask_token_id

    def token_ids(self, texts, chunk=1024):
        out = []
        for i in range(0, len(texts), chunk):
            part = list(texts[i:i + chunk])
            if self.format == ST_FORMAT:
                enc = self._st.preprocess(part) if hasattr(self._st, 'preprocess') else self._st.tokenize(part)
                ids, lengths = enc['input_ids'], enc['attention_mask'].sum(1)
                out.extend(np.asarray(row[:n], dtype=np.int32) for row, n in zip(ids.tolist(), lengths.tolist()))
            else:
                enc = self.tokenizer(part, truncation=True, max_length=self.max_length, return_attention_mask=False,
                                     return_token_type_ids=False)
                out.extend(np.asarray(ids, dtype=np.int32) for ids in enc['input_ids'])
        return out


@functools.lru_cache(maxsize=4)
def tower_tokenizer(name):
    """The tokenizer of tower `name`, loaded once per process; loading leaves the global RNG as it was (a cached
    tokenizer and a freshly loaded one must not change a run's random numbers)."""
    with torch.random.fork_rng(devices=[]):
        return TowerTokenizer(name, tower_format(name))
