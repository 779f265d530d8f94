"""Batch assembly shared by the data loaders and the evaluation loops: collate items into the batch dicts
described in basic/data_provider.py, and move batches to a device. Only torch and numpy, so
evaluation.py can use it without importing the data layer."""
import numpy as np
import torch


def collate_ids(seqs):
    """Pad int arrays with [PAD]=0 to the batch max: ids (B, L) long, mask (B, L) float, lengths."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s.astype(np.int64)) for s in seqs],
                                          batch_first=True)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return {'ids': ids, 'mask': mask, 'lengths': lengths}


def collate_video(items):
    """items: (capped frames (n_i, D), mean (D,)) -> zero-padded frames (B, L, D), mask, lengths, mean."""
    frames = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(f) for f, _ in items], batch_first=True)
    lengths = torch.tensor([len(f) for f, _ in items], dtype=torch.long)
    mask = (torch.arange(frames.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).float()
    mean = torch.from_numpy(np.stack([m for _, m in items]))
    return {'frames': frames, 'mask': mask, 'lengths': lengths, 'mean': mean}


def collate(items):
    """Collate any of the item kinds above into the batch dicts described in the module docstring."""
    batch = {'index': torch.tensor([it['index'] for it in items], dtype=torch.long)}
    for key in ('video', 'video_aug'):
        if key in items[0]:
            batch[key] = collate_video([it[key] for it in items])
    if 'text' in items[0]:
        batch['text'] = {role: collate_ids([it['text'][role] for it in items]) for role in items[0]['text']}
    if 'video_index' in items[0]:
        vid = torch.tensor([it['video_index'] for it in items])
        batch['video_index'] = vid
        batch['same_video'] = (vid.unsqueeze(0) == vid.unsqueeze(1)) & ~torch.eye(len(items), dtype=torch.bool)
    return batch


def move_to(batch, device):
    """Recursively move every tensor of a batch to `device` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch
