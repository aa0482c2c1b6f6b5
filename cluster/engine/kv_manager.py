"""The engine's KV cache manager for one attention replica: the block tables of its sequences, the
reservations that let every admitted sequence finish, and the prefix cache. The replica only stores
tensors; it learns its tables from the `BlockUpdate` of each chunk (as vLLM's scheduler owns the
blocks and its workers store them).

Full-attention layers: a sequence's table grows to its whole lifetime (prompt + max_tokens), and
admission reserves that many blocks up front, so a running sequence is never preempted. Blocks are
taken from the pool only when a chunk reaches them, so free blocks keep their cached content longer.

Sliding-window layers: a pool of their own, sized so that every sequence's window plus one step's
chunks always fit (`KVSpec.sliding_blocks`): no reservation is needed. Blocks that fall out of a
sequence's window go back to the pool (cf. vLLM's SlidingWindowManager); attention still sees
exactly the last `sliding_window` keys.

Prefix caching: complete blocks are registered under a hash of (parent hash, token ids) once the
step that wrote them has run; a new sequence takes over the longest chain of cached full blocks of
its prompt, provided the sliding pool still holds the blocks of the window before that point, and
at least one prompt token is left to compute (its logits choose the first output token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine.block_pool import BlockPool
from model_shards.kv_cache import BlockUpdate


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class SeqKV:
    full: list[int]  # full-attention block ids, by block index
    sliding: dict[int, int]  # block index -> id, for the blocks inside the window
    full_total: int  # full blocks the sequence's whole lifetime needs
    registered: int  # complete blocks [0, registered) already offered to the prefix cache
    sent_full: int = 0  # full blocks the replica already knows
    unsent_sliding: list[tuple[int, int]] = field(default_factory=list)

    @property
    def owed(self) -> int:
        """Full blocks reserved for it and not taken yet."""
        return self.full_total - len(self.full)


class ReplicaKV:
    def __init__(self, num_blocks: int, sliding_blocks: int, block_size: int, window: int,
                 caching: bool = True) -> None:
        self.full = BlockPool(num_blocks)
        self.sliding = BlockPool(sliding_blocks)
        self.block_size = block_size
        self.window = window
        self.caching = caching
        self.seqs: dict[int, SeqKV] = {}

    # -- admission -------------------------------------------------------------------------------
    def match(self, hashes: list[bytes], prompt_len: int) -> int:
        """Prompt tokens whose KV this replica's cache holds: whole blocks, at least one token left."""
        if not self.caching:
            return 0
        n, limit = 0, min(len(hashes), (prompt_len - 1) // self.block_size)
        while n < limit and self.full.lookup(hashes[n]) is not None:
            n += 1
        while n > 0 and any(self.sliding.lookup(hashes[i]) is None for i in range(self._first_window_block(n), n)):
            n -= 1
        return n * self.block_size

    def _first_window_block(self, blocks: int) -> int:
        """The first block a chunk starting at `blocks` * block_size reads on sliding layers."""
        return max(0, blocks * self.block_size - (self.window - 1)) // self.block_size

    def fits(self, hashes: list[bytes], hit_tokens: int, lifetime: int) -> bool:
        """Whether a sequence with this prefix hit fits beside every reservation."""
        hit = hashes[:hit_tokens // self.block_size]
        pinned_free = sum(self.full.refs[self.full.cached[h]] == 0 for h in hit)  # holding them takes them
        need = blocks_for(lifetime, self.block_size) - len(hit) + pinned_free
        return need <= self.full.free - sum(s.owed for s in self.seqs.values())

    def admit(self, seq_id: int, hashes: list[bytes], hit_tokens: int, lifetime: int) -> None:
        """Hold the sequence's cached prefix and reserve the rest of its lifetime (`fits` said yes)."""
        n = hit_tokens // self.block_size
        full = [self.full.cached[h] for h in hashes[:n]]
        for block in full:
            self.full.hold(block)
        seq = SeqKV(full, {}, blocks_for(lifetime, self.block_size), n)
        for i in range(self._first_window_block(n), n):
            block = self.sliding.cached[hashes[i]]
            self.sliding.hold(block)
            seq.sliding[i] = block
            seq.unsent_sliding.append((i, block))
        self.seqs[seq_id] = seq

    # -- steps -----------------------------------------------------------------------------------
    def plan(self, seq_id: int, start: int, end: int) -> BlockUpdate:
        """Blocks for a chunk of positions [start, end): take what it reaches, drop the sliding blocks it
        no longer reads; returns what the replica must learn."""
        seq, bs = self.seqs[seq_id], self.block_size
        while len(seq.full) < blocks_for(end, bs):
            seq.full.append(self.full.allocate())
        first = max(0, start - (self.window - 1)) // bs  # the first block its sliding layers read
        for index in sorted(i for i in seq.sliding if i < first):
            self.sliding.release(seq.sliding.pop(index))
        for index in range(first, blocks_for(end, bs)):
            if index not in seq.sliding:
                if index * bs < start:
                    raise RuntimeError(f"sequence {seq_id} lost its sliding-window block {index} before position "
                                       f"{start} (a bug in the KV manager)")
                seq.sliding[index] = self.sliding.allocate()
                seq.unsent_sliding.append((index, seq.sliding[index]))
        update = BlockUpdate(tuple(seq.full[seq.sent_full:]), tuple(seq.unsent_sliding), first)
        seq.sent_full, seq.unsent_sliding = len(seq.full), []
        return update

    def computed(self, seq_id: int, end: int, hashes: list[bytes]) -> None:
        """A step wrote positions up to `end`: its complete blocks become prefix-cache entries."""
        seq = self.seqs.get(seq_id)
        if seq is None or not self.caching:
            return
        complete = min(end // self.block_size, len(hashes))
        for i in range(seq.registered, complete):
            self.full.register(hashes[i], seq.full[i])
            if i in seq.sliding:
                self.sliding.register(hashes[i], seq.sliding[i])
        seq.registered = max(seq.registered, complete)

    def release(self, seq_id: int) -> None:
        """The sequence ended: its blocks go back, the last ones first (they are the least likely to
        be shared, so the pool should evict them before the prefix)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        for block in reversed(seq.full):
            self.full.release(block)
        for index in sorted(seq.sliding, reverse=True):
            self.sliding.release(seq.sliding[index])

    def reset(self) -> None:
        self.full.reset()
        self.sliding.reset()
        self.seqs.clear()

    # -- telemetry -------------------------------------------------------------------------------
    def usage(self) -> float:
        """Fraction of full-attention blocks held by running sequences (a shared block counts once)."""
        return self.full.used / self.full.num_blocks

    def cached_share(self) -> float:
        """Fraction of full-attention blocks that hold reusable prefix content (held or free)."""
        return len(self.full.cached) / self.full.num_blocks
