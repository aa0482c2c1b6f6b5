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
