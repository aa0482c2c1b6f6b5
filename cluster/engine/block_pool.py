"""The KV blocks of one attention replica as the engine owns them: who holds each block, and which
blocks hold reusable prefix content.

A block is held (reference-counted) by the sequences whose tables list it. A block nobody holds is
free; if it holds complete content it stays findable by its key (a prefix-cache entry) until it is
allocated to someone else. Free blocks form one queue in least-recently-freed order: allocation
takes the head, so cached content is evicted oldest first and only when memory is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

# A cached block's identity: the hash of (its parent block's hash, its token ids), which pins both its
# tokens and everything before them. (Full and sliding-window layers have pools of their own.)
BlockKey = bytes
ROOT = b""


def chain_hashes(tokens: list[int], block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """Hashes of each complete block of `tokens` (a partial last block has none). blake2b, not Python's
    hash(): a client must not be able to craft a prompt that collides with another client's prefix."""
    out = []
    data = np.asarray(tokens[:len(tokens) // block_size * block_size], dtype=np.int64).reshape(-1, block_size)
    for row in data:
        parent = hashlib.blake2b(parent + row.tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


def extend_hashes(hashes: list[bytes], new_tokens: list[int], block_size: int) -> None:
    """Append the hashes of the complete blocks of `new_tokens`, the tokens that follow the
    len(hashes) blocks already hashed."""
    if len(new_tokens) >= block_size:
        hashes.extend(chain_hashes(new_tokens, block_size, hashes[-1] if hashes else ROOT))


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.reset()

    @property
    def free(self) -> int:
        """Blocks nobody holds (cached content among them)."""
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """A free block, held once; its cached content (if any) is evicted."""
        if not self._free:
            raise RuntimeError("no free KV block (the engine's reservations should have prevented this)")
        block, _ = self._free.popitem(last=False)
        key = self.key_of[block]
        if key is not None:
            del self.cached[key]
            self.key_of[block] = None
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more holder of `block` (a cache hit, or a second sequence sharing it)."""
        if self.refs[block] == 0:
            del self._free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free[block] = None  # the tail: evicted last

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def register(self, key: BlockKey, block: int) -> None:
        """`block` now holds complete content known by `key`. An existing entry for the same key wins
        (two sequences computed the same block): the other copy stays private and is freed as usual."""
        if key not in self.cached and self.key_of[block] is None:
            self.cached[key] = block
            self.key_of[block] = key

    def reset(self) -> None:
        """Every block free and nothing cached (the replica's memory is gone, e.g. after a failure)."""
        self.refs = [0] * self.num_blocks
        self.key_of: list[BlockKey | None] = [None] * self.num_blocks
        self.cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(self.num_blocks))
