"""The preallocated KV cache: per layer (max_batch, max_len, kv_heads, head_dim) for K and V, one row per
sequence slot. Allocated once per engine; a request too long for it is refused before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EngineError


@dataclass
class KVCache:
    k: list  # per layer (max_batch, max_len, kv_heads, head_dim)
    v: list
    max_batch: int
    max_len: int

    @staticmethod
    def allocate(text_cfg, max_batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (max_batch, max_len, text_cfg.num_key_value_heads, text_cfg.head_dim)
        try:
            k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_cfg.num_hidden_layers)]
            v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_cfg.num_hidden_layers)]
        except torch.OutOfMemoryError:
            need = 2 * text_cfg.num_hidden_layers * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            raise EngineError(f"the KV cache for {max_batch} sequences x {max_len} tokens needs {need / 2**30:.1f} GiB "
                              f"on {device}, which is not free; lower max_batch or max_len") from None
        return KVCache(k, v, max_batch, max_len)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
