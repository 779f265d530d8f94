"""CLIP image embeddings with transformers' vision tower, shared by the image and the video feature extractors,
and the identity of the CLIP that made a feature folder.

    embedder = ClipImageEmbedder('openai/clip-vit-base-patch32', device='cuda')   # hub id or local folder
    feats = embedder.embed([PIL.Image, ...])                                        # (N, 512) float32

The vision tower with its projection (`CLIPVisionModelWithProjection.image_embeds`, the same numbers as
`CLIPModel.get_image_features`) is what the original image code used (`clip.encode_image`: projected, not
normalised), and the image processor applies the same preprocessing as the original `clip` package: bicubic
resize of the shorter side, centre crop, RGB, scale to [0, 1], normalise with CLIP's mean and std. The PIL
backend is used, as the `clip` package used PIL. A full CLIP folder (text and vision, as the hub's
`openai/clip-vit-base-patch32`) and a vision-only one both load; from a full one the projection size is the
model's `projection_dim`.

Identity (`clip_identity`): {'clip': the name or folder given, 'dim': projection size, 'fingerprint': sha1 of
the visual projection's float32 weights}. The extractors record it in the feature folder (`extract_settings.json`
of util/extract_features.py, `extract_info.json` of util/extract_image_features.py); `feature_clip(folder)`
reads it back and `clip_mismatch(a, b)` says whether two identities name different CLIPs. A zero-shot text
model must come from the CLIP that made the features (docs/search.md, 'No training: multilingual CLIP').

`save_tiny_clip(folder)` writes a tiny random CLIP (text and vision towers, tokenizer, processor) for tests and
offline demos.
"""
import hashlib
import json
import os

import numpy as np
import torch

from basic.errors import DataError

DEFAULT_CLIP = 'openai/clip-vit-base-patch32'


def _quiet():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_image_processor(name_or_path):
    """CLIP's image processor (PIL backend when this transformers has it, so no torchvision is needed)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:                       # older transformers: the PIL path is the default one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(name_or_path)


def looks_local(name_or_path):
    """True for a folder path (absolute, relative with a leading '.', or existing), False for a hub id."""
    return os.path.isabs(name_or_path) or name_or_path.startswith('.') or os.path.exists(name_or_path)


def load_clip_vision(name_or_path):
    """`CLIPVisionModelWithProjection` of a full CLIP folder / hub id (projection size = the model's
    `projection_dim`) or of a vision-only one."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == 'clip':                 # a full CLIP: the vision config does not hold projection_dim
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=vision)
    return CLIPVisionModelWithProjection.from_pretrained(name_or_path)


def projection_fingerprint(weight):
    """sha1 (16 hex digits) of a projection matrix's float32 bytes: what tells two CLIPs apart."""
    data = weight.detach().to('cpu', torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def clip_identity(name, visual_projection):
    """{'clip': name, 'dim': output size, 'fingerprint': ...} of a CLIP from its visual projection (nn.Linear)."""
    return {'clip': name, 'dim': int(visual_projection.weight.shape[0]),
            'fingerprint': projection_fingerprint(visual_projection.weight)}


class ClipImageEmbedder:
    """CLIP vision tower + projection in eval mode on `device`; `embed(images)` -> (N, dim) float32 array;
    `identity` says which CLIP it is (`clip_identity`)."""

    def __init__(self, name_or_path=DEFAULT_CLIP, device='cpu', dtype=torch.float32):
        _quiet()
        if looks_local(name_or_path) and not os.path.isfile(os.path.join(name_or_path, 'config.json')):
            raise DataError(f'--model {name_or_path}: no CLIP folder there (config.json missing); pass a hub id '
                            f'such as {DEFAULT_CLIP} or a folder saved with save_pretrained')
        try:
            self.model = load_clip_vision(name_or_path)
            self.processor = load_image_processor(name_or_path)
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f'--model {name_or_path}: could not load CLIP ({str(e).splitlines()[0]}); download it '
                            'once with network access, or pass a local folder') from None
        self.device = torch.device(device)
        self.dtype = dtype
        self.model.to(self.device, dtype).eval()
        self.name = name_or_path
        self.identity = clip_identity(name_or_path, self.model.visual_projection)

    @property
    def dim(self):
        return self.model.config.projection_dim

    def preprocess(self, images):
        """PIL images -> pixel tensor (N, 3, S, S), float32 on the CPU."""
        return self.processor(images=[im.convert('RGB') for im in images], return_tensors='pt')['pixel_values']

    @torch.inference_mode()
    def embed_pixels(self, pixels):
        """(N, 3, S, S) pixel tensor -> (N, dim) float32 array."""
        out = self.model(pixel_values=pixels.to(self.device, self.dtype)).image_embeds
        return out.float().cpu().numpy()

    def embed(self, images):
        """Embeddings of a list of PIL images, (N, dim) float32; an empty list gives (0, dim)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_pixels(self.preprocess(images))


# ============ which CLIP made a feature folder ============

SETTINGS_FILES = ('extract_settings.json', 'extract_info.json')    # util/extract_features.py, extract_image_features.py


def feature_clip(feature_dir):
    """The identity recorded in a feature folder by the extractors, or None (features from elsewhere). Folders
    written before the fingerprint was recorded give the model name and size with fingerprint None."""
    for name in SETTINGS_FILES if feature_dir else ():
        path = os.path.join(feature_dir, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    settings = json.load(f)
            except (OSError, ValueError):
                return None
            if isinstance(settings.get('clip'), dict):
                return settings['clip']
            if settings.get('model'):
                return {'clip': settings['model'], 'dim': settings.get('dims', settings.get('dim')),
                        'fingerprint': None}
    return None


def clip_mismatch(a, b):
    """None when identities `a` and `b` may name the same CLIP, else a short reason. Fingerprints decide when
    both have one; otherwise two hub ids must be equal (a local folder name says nothing); sizes must agree."""
    if a is None or b is None:
        return None
    if a.get('dim') and b.get('dim') and int(a['dim']) != int(b['dim']):
        return f'{a["dim"]}-d vs {b["dim"]}-d'
    if a.get('fingerprint') and b.get('fingerprint'):
        return None if a['fingerprint'] == b['fingerprint'] else 'different weights'
    names = [str(x.get('clip') or '') for x in (a, b)]
    if all(n and not looks_local(n) for n in names) and names[0].lower() != names[1].lower():
        return 'different models'
    return None


# ============ a tiny CLIP for tests and demos ============

def _byte_level_vocab():
    """The 256 byte-level symbols of CLIP's BPE, each also as a word end ('</w>'), after the special tokens."""
    from tokenizers import pre_tokenizers
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for s in symbols + [f'{s}</w>' for s in symbols]:
        vocab[s] = len(vocab)
    return vocab


def save_tiny_clip(folder, image_size=32, patch_size=8, hidden=32, layers=2, heads=4, projection_dim=16, seed=0):
    """Write a tiny random CLIP to `folder` (offline): `CLIPModel` (text and vision towers) with its image processor
    and a byte-level tokenizer without merges (every word is spelt by its bytes). The vision tower and its
    projection are the ones a vision-only tiny CLIP of the same seed had, so features extracted with it are
    unchanged."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection
    _quiet()
    torch.manual_seed(seed)
    vision_cfg = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                      projection_dim=projection_dim)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg))
    vocab = _byte_level_vocab()
    text_cfg = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, vocab_size=len(vocab), max_position_embeddings=64,
                    projection_dim=projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim))
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64).save_pretrained(folder)
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    Processor(size={'shortest_edge': image_size},
              crop_size={'height': image_size, 'width': image_size}).save_pretrained(folder)
    return folder
