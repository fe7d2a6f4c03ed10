"""Vision-tower outputs of identical images and videos, reused across requests.

The key is a content hash of the preprocessed patches (after resizing and normalisation, so the same picture
sent at another size or with other pixel options is another entry) and the grid: two requests with the same
image bytes under the same options share the tower's output whatever the source (a data: URI, a path, PIL).
Hashing runs in the submitting thread on the CPU tensors, before they move to the device, so the engine thread
only does dictionary lookups. Values are kept on the model's device in an LRU bounded in bytes
(`vision_cache_mb`, 0 turns it off); a tower call computes only the images not found, in one batch.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..bytes_lru import MIB, ByteLRU

# which processed-input keys hold which medium's patches and grid
MEDIA = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def content_keys(inputs: dict) -> dict:
    """{"image": [key per image], "video": [key per video]} of a processed dict whose tensors are on the CPU."""
    keys = {}
    for kind, (pixels_name, grid_name) in MEDIA.items():
        pixels, grid = inputs.get(pixels_name), inputs.get(grid_name)
        if pixels is None or grid is None:
            continue
        pixels, grid = torch.as_tensor(pixels), torch.as_tensor(grid)
        if pixels.device.type != "cpu" or grid.dim() != 2 or int(grid.prod(-1).sum()) != pixels.shape[0]:
            continue  # not hashable here (or malformed: the model says what is wrong)
        rows = pixels.reshape(pixels.shape[0], -1).contiguous()
        start, out = 0, []
        for t, h, w in grid.tolist():
            n = t * h * w
            digest = hashlib.blake2b(digest_size=16)
            digest.update(f"{kind}:{t}x{h}x{w}:{rows.dtype}:{rows.shape[1]}".encode())
            digest.update(rows[start:start + n].view(torch.uint8).numpy())
            out.append(digest.hexdigest())
            start += n
        keys[kind] = out
    return keys


class VisionCache:
    def __init__(self, capacity_mb: float = 256):
        if not capacity_mb >= 0:
            raise ValueError(f"vision_cache_mb must be >= 0, got {capacity_mb!r}")
        self.lru = ByteLRU(budget_bytes=int(capacity_mb * MIB))

    @property
    def enabled(self) -> bool:
        return self.lru.budget > 0

    def encoder(self, model, keys: dict):
        """A `prepare_inputs(encode=...)` callable that looks every medium up by its key and runs the tower on
        the missing ones only (None when caching is off or nothing was hashed)."""
        if not self.enabled or not keys:
            return None

        def encode(kind: str, pixels, grid):
            medium_keys = keys.get(kind)
            if medium_keys is None or len(medium_keys) != len(grid):
                return model.encode_media(kind, pixels, grid)
            return self._encode(model, kind, pixels, torch.as_tensor(grid), medium_keys)

        return encode

    def _encode(self, model, kind, pixels, grid, medium_keys):
        merge = model.config.vision.spatial_merge_size ** 2
        found = [self.lru.get(k) for k in medium_keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            pixels = torch.as_tensor(pixels)
            sizes = grid.prod(-1).tolist()
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + n)
            rows = torch.cat([pixels[starts[i]:starts[i + 1]] for i in missing]) if len(missing) < len(sizes) \
                else pixels
            fresh = model.encode_media(kind, rows, grid[missing])
            offset = 0
            for i in missing:
                n = sizes[i] // merge
                found[i] = fresh[offset:offset + n].clone()  # its own storage: the LRU counts whole storages
                offset += n
                self.lru.put(medium_keys[i], found[i])
        return torch.cat(found) if len(found) > 1 else found[0]

    def stats(self) -> dict:
        info = self.lru.info()
        return {"hits": info.hits, "misses": info.misses, "entries": info.entries, "bytes": info.bytes,
                "capacity_bytes": info.budget, "evictions": info.evictions}


def maybe_keys(cache: Optional[VisionCache], inputs: dict) -> dict:
    return content_keys(inputs) if cache is not None and cache.enabled else {}
