"""Static KV cache: rows x slots, preallocated once (gpt-fast style).

A cache holds K and V for `num_layers` attention layers as `[L, R, Hkv, S, Dh]` tensors: row r is one
sequence slot of the batch, slot s an index along its sequence axis. A forward step writes the new
tokens' K/V at (cache_rows[b], cache_slots[b, t]) and then attends over all S slots (or the first
`kv_len`) of that row under a boolean mask. Stale entries are never read as long as the mask excludes
them (the default mask admits only key slots <= the query's slot).

Within one call each (row, slot) pair must be written at most once (duplicate writes are undefined).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """K/V storage for `num_layers` layers.

    k, v: [L, R, Hkv, S, Dh] (L layers, R rows, Hkv kv heads, S slots, Dh head dim).
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, num_layers: int, num_rows: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
              *, dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        """A zero-filled cache of the given geometry."""
        if num_rows <= 0 or max_seq_len <= 0:
            raise ValueError(f"KV cache needs batch_size > 0 and max_seq_len > 0, got {num_rows}, {max_seq_len}")
        shape = (num_layers, num_rows, num_kv_heads, max_seq_len, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device),
                   v=torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def write_and_read(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, cache_rows: torch.Tensor | None,
                       cache_slots: torch.Tensor, kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k_new/v_new [B,Hkv,T,Dh] at (cache_rows [B], cache_slots [B,T]) of `layer`; return the
        rows' keys and values [B,Hkv,S',Dh] with S' = kv_len or S (the first S' slots)."""
        k_layer, v_layer = self.k[layer], self.v[layer]  # [R,Hkv,S,Dh]
        rows = (torch.arange(k_new.shape[0], device=k_layer.device) if cache_rows is None else cache_rows)
        # advanced indices (rows [B,1], slots [B,T]) around a slice -> the indexed view is [B,T,Hkv,Dh]
        k_layer[rows[:, None], :, cache_slots] = k_new.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows[:, None], :, cache_slots] = v_new.transpose(1, 2).to(v_layer.dtype)
        if cache_rows is not None or k_new.shape[0] != k_layer.shape[0]:
            k_layer, v_layer = k_layer[rows], v_layer[rows]
        if kv_len is not None:
            k_layer, v_layer = k_layer[:, :, :kv_len], v_layer[:, :, :kv_len]
        return k_layer, v_layer
