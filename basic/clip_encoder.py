"""CLIP image embeddings with transformers' vision tower, shared by the image and the video feature extractors.

    embedder = ClipImageEmbedder('openai/clip-vit-base-patch32', device='cuda')   # hub id or local folder
    feats = embedder.embed([PIL.Image, ...])                                        # (N, 512) float32

The vision tower with its projection (`CLIPVisionModelWithProjection.image_embeds`) is what the original
image code used (`clip.encode_image`: projected, not normalised), and the image processor applies the same
preprocessing as the original `clip` package: bicubic resize of the shorter side, centre crop, RGB, scale to
[0, 1], normalise with CLIP's mean and std. The PIL backend is used, as the `clip` package used PIL.

`save_tiny_clip(folder)` writes a tiny random CLIP (config, weights, processor) for tests and offline demos.
"""
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


class ClipImageEmbedder:
    """CLIP vision tower + projection in eval mode on `device`; `embed(images)` -> (N, dim) float32 array."""

    def __init__(self, name_or_path=DEFAULT_CLIP, device='cpu', dtype=torch.float32):
        from transformers import CLIPVisionModelWithProjection
        _quiet()
        looks_local = os.path.isabs(name_or_path) or name_or_path.startswith('.') or os.path.exists(name_or_path)
        if looks_local and not os.path.isfile(os.path.join(name_or_path, 'config.json')):
            raise DataError(f'--model {name_or_path}: no CLIP folder there (config.json missing); pass a hub id '
                            f'such as {DEFAULT_CLIP} or a folder saved with save_pretrained')
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(name_or_path)
            self.processor = load_image_processor(name_or_path)
        except (OSError, ValueError) as e:
            raise DataError(f'--model {name_or_path}: could not load CLIP ({str(e).splitlines()[0]}); download it '
                            'once with network access, or pass a local folder') from None
        self.device = torch.device(device)
        self.dtype = dtype
        self.model.to(self.device, dtype).eval()
        self.name = name_or_path

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


def save_tiny_clip(folder, image_size=32, patch_size=8, hidden=32, layers=2, heads=4, projection_dim=16, seed=0):
    """Write a tiny random CLIP vision model with projection and its image processor to `folder` (offline)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    _quiet()
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              projection_dim=projection_dim)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = CLIPImageProcessor
    Processor(size={'shortest_edge': image_size},
              crop_size={'height': image_size, 'width': image_size}).save_pretrained(folder)
    return folder
