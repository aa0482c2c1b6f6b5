"""The engine's KV blocks: hashing, reference counts, eviction, sliding windows, reservations."""

from __future__ import annotations

from cluster.engine.block_pool import BlockPool, chain_hashes, extend_hashes
from cluster.engine.kv_manager import ReplicaKV

BS, W = 16, 128


def test_chain_hashes_pin_the_whole_prefix() -> None:
    a = chain_hashes(list(range(40)), BS)
    assert len(a) == 2  # the partial third block has none
    assert chain_hashes(list(range(32)), BS) == a
    changed = chain_hashes([99] + list(range(1, 40)), BS)
    assert changed[0] != a[0] and changed[1] != a[1]  # a later block's identity includes everything before it
    grown = list(a)
    extend_hashes(grown, list(range(32, 64)), BS)
    assert grown == chain_hashes(list(range(64)), BS)


def test_pool_evicts_cached_blocks_least_recently_freed_first() -> None:
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    for i, b in enumerate(blocks):
        pool.register(bytes([i]), b)
    for b in blocks:
        pool.release(b)
    assert pool.free == 3 and pool.lookup(bytes([0])) == blocks[0]
    pool.hold(blocks[0])  # a hit takes it out of the free queue
    pool.release(blocks[0])  # ... and puts it back as the most recently freed
    assert pool.allocate() == blocks[1]  # the oldest free block goes first, and its content with it
    assert pool.lookup(bytes([1])) is None and pool.lookup(bytes([0])) == blocks[0]


def computed(kv: ReplicaKV, seq: int, tokens: list[int], lifetime: int) -> list[bytes]:
    """Admit and run a whole sequence's tokens in one chunk."""
    hashes = chain_hashes(tokens, BS)
    hit = kv.match(hashes, len(tokens))
    assert kv.fits(hashes, hit, lifetime)
    kv.admit(seq, hashes, hit, lifetime)
    kv.plan(seq, hit, len(tokens))
    kv.computed(seq, len(tokens), hashes)
    return hashes


def test_blocks_shared_by_two_sequences_survive_the_end_of_one() -> None:
    kv = ReplicaKV(64, 64, BS, W)
    prompt = list(range(300))
    computed(kv, 1, prompt, 320)
    hashes = chain_hashes(prompt + [7] * 20, BS)
    hit = kv.match(hashes, 320)
    assert hit == 288  # 18 whole blocks of the shared 300 tokens
    kv.admit(2, hashes, hit, 340)
    shared = kv.seqs[2].full[:18]
    assert shared == kv.seqs[1].full[:18]
    distinct = len(set(kv.seqs[1].full) | set(kv.seqs[2].full))
    assert kv.usage() == distinct / 64 < (len(kv.seqs[1].full) + len(kv.seqs[2].full)) / 64  # counted once
    kv.release(1)
    assert all(kv.full.refs[b] == 1 for b in shared)  # still held by sequence 2
    for _ in range(kv.full.free):  # memory pressure: every free block is taken
        kv.full.allocate()
    assert all(kv.full.refs[b] == 1 for b in shared) and kv.full.lookup(hashes[0]) == shared[0]


def test_cached_free_blocks_are_evicted_when_admission_needs_them() -> None:
    kv = ReplicaKV(40, 64, BS, W)
    computed(kv, 1, list(range(320)), 330)  # 20 blocks, then cached and free
    kv.release(1)
    assert kv.cached_share() == 20 / 40 and kv.usage() == 0
    other = chain_hashes(list(range(1000, 1600)), BS)
    assert kv.match(other, 600) == 0 and kv.fits(other, 0, 620)  # 39 blocks: fits only by evicting
    kv.admit(2, other, 0, 620)
    kv.plan(2, 0, 600)  # 38 blocks: the 20 never used, then 18 cached ones
    old = chain_hashes(list(range(320)), BS)
    assert kv.full.lookup(old[19]) is None and kv.full.lookup(old[2]) is None  # evicted, the prefix's tail first
    assert kv.full.lookup(old[0]) is not None
    assert not kv.fits(other, 0, 64)  # and now the reservation of sequence 2 is what stands in the way


def test_reservations_refuse_what_could_not_finish() -> None:
    kv = ReplicaKV(10, 64, BS, W)
    kv.admit(1, [], 0, 100)  # 7 blocks reserved, none taken yet
    assert kv.fits([], 0, 48) and not kv.fits([], 0, 49)  # 3 left


def test_sliding_blocks_leave_with_the_window() -> None:
    kv = ReplicaKV(64, 64, BS, W)
    kv.admit(1, [], 0, 400)
    update = kv.plan(1, 0, 300)
    assert len(update.full) == 19 and [i for i, _ in update.sliding] == list(range(19))
    kv.computed(1, 300, [])
    update = kv.plan(1, 300, 301)  # decode: reads positions 173..299, writes 300
    assert update.sliding_from == 173 // BS and update.full == ()
    assert sorted(kv.seqs[1].sliding) == list(range(173 // BS, 19))
    assert kv.sliding.free == 64 - len(kv.seqs[1].sliding)
