import torch

from model_shards.kv_cache import gather_rows


def test_gather_rows_equals_advanced_indexing() -> None:
    """The cache gather copies whole rows: the same tensor as table[rows], for flat and [G, L] indices."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, 2, 8, generator=gen).bfloat16()  # [rows, nkv, d]
    for rows in (torch.randint(0, 64, (5,), generator=gen), torch.randint(0, 64, (3, 7), generator=gen),
                 torch.zeros(2, 0, dtype=torch.long)):
        got = gather_rows(table, rows)
        assert got.shape == (*rows.shape, 2, 8)
        assert torch.equal(got, table[rows])


def test_every_attention_bias_of_a_mixed_step_is_aligned(monkeypatch) -> None:
    """The alignment rule (flash.check_aligned), for decode rows of several lengths and sliding-window
    prefill chunks of several lengths and starts: every bias that reaches the kernel passes the check
    that CUDA's kernel makes (the outputs are compared with the reference in test_flash.py and
    test_reference_transformers.py)."""
    import model_shards.flash as flash
    from model_shards.attention import attention_block
    from model_shards.batch import SeqChunk, plan_step
    from model_shards.config import preset
    from model_shards.kv_cache import KVCache
    from model_shards.random_checkpoint import random_weights
    from model_shards.rope import Rope

    cfg = preset("tiny")
    w = random_weights(cfg, seed=1).attention
    biases: list[tuple[int, ...]] = []
    kernel = flash.attention_lse

    def checked(q, k, v, bias, causal, scale):
        if bias is not None:
            flash.check_aligned(bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
            biases.append(tuple(bias.shape))
        return kernel(q, k, v, bias, causal, scale)

    monkeypatch.setattr(flash, "attention_lse", checked)
    kv = KVCache(cfg, num_blocks=64, block_size=16, dtype=torch.float32)
    chunks = [SeqChunk(0, 0, 37), SeqChunk(1, 0, 5), SeqChunk(2, 0, 150)]
    for c in chunks:
        kv.place(c.seq_id, 400)
    gen = torch.Generator().manual_seed(0)
    rope = Rope(cfg)
    sliding = next(layer for layer in range(cfg.num_hidden_layers) if cfg.is_sliding(layer))
    for step in (chunks, [SeqChunk(0, 37, 1), SeqChunk(1, 5, 1), SeqChunk(2, 150, 9)]):  # prefill, then mixed
        layout = plan_step(step)
        x = torch.randn(layout.num_tokens, cfg.hidden_size, generator=gen)
        cos, sin = rope.cos_sin(layout.positions, torch.float32)
        view = kv.view(layout)
        for layer in (0, sliding):
            attention_block(x, w[layer], cfg, layer, cos, sin, kv, view)
        assert view.decode_full_rows.shape[1] % flash.ALIGN == 0
        assert all(c.slide_rows.shape[0] % flash.ALIGN == 0 for c in view.chunks)
    assert any(shape[-1] == 128 for shape in biases) and any(shape[-1] % 16 == 8 for shape in biases)
