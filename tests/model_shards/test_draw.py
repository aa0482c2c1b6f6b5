import pytest
import torch

from model_shards.draw import draw, hash_bits, keep_top_k, race, row_keys, row_seed, uniforms
from model_shards.sampling import EXP_FLOOR


def test_row_seeds_are_fixed_by_seed_and_step_and_differ() -> None:
    seeds = [row_seed(7, n) for n in range(1000)] + [row_seed(s, 3) for s in range(1000)]
    assert seeds[:1000] == [row_seed(7, n) for n in range(1000)]
    assert len(set(seeds)) == 2000 - 1 and all(0 <= x < 2**63 for x in seeds)  # row_seed(7, 3) twice


# The noise is a function of (seed, token index, vocabulary position) alone: these values hold on every
# device (the GPU test below checks CUDA against them).
PINNED_BITS = [[8185156, 13142806, 9583252, 6343904, 14348352, 6311337],
               [13330253, 4051887, 7648697, 12931353, 9871802, 4587994],
               [1188686, 11867931, 4160980, 5206698, 12500449, 13274889]]
PINNED_TAIL = [3125707, 12247659, 11202612]  # seed 0, token 0, the vocabulary's last three positions
FOUR = [[0.1, 0.2, 0.3, 0.4]] * 12
PINNED_BY_SEED = [3, 0, 0, 3, 3, 1, 3, 1, 3, 2, 2, 2]  # seeds 0..11, token 5
PINNED_BY_STEP = [0, 2, 3, 3, 2, 3, 3, 2, 1, 1, 2, 2]  # seed 42, tokens 0..11


def test_the_noise_is_pinned() -> None:
    assert hash_bits(row_keys([7, 7, 123], [0, 3, 0], "cpu"), 0, 6).tolist() == PINNED_BITS
    assert hash_bits(row_keys([0], [0], "cpu"), 201085, 3).tolist() == [PINNED_TAIL]
    assert race(torch.tensor(FOUR), list(range(12)), [5] * 12).tolist() == PINNED_BY_SEED
    assert race(torch.tensor(FOUR), [42] * 12, list(range(12))).tolist() == PINNED_BY_STEP


def test_the_uniforms_are_uniform_and_do_not_depend_on_the_blocking() -> None:
    keys = row_keys([1, 2, 3, 4], [0, 0, 7, 7], "cpu")
    u = uniforms(keys, 201088)
    assert torch.equal(u, uniforms(keys, 201088, block=1000))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=2e-3) and float(u.var()) == pytest.approx(1 / 12, abs=1e-3)
    bits = hash_bits(keys, 0, 201088)
    for bit in range(24):  # each of the 24 bits is set about half the time
        assert float(((bits >> bit) & 1).float().mean()) == pytest.approx(0.5, abs=5e-3)
    rows = hash_bits(row_keys(list(range(64)), [9] * 64, "cpu"), 0, 1)[:, 0]  # neighbouring seeds: unrelated
    assert len(set(rows.tolist())) == 64


def test_the_race_follows_the_distribution_and_never_picks_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0, 0.0])[None].expand(4000, 7).contiguous() * 5  # any total
    counts = torch.bincount(race(probs, [1] * 4000, list(range(4000))), minlength=7).tolist()
    assert counts[0] == counts[2] == counts[5] == counts[6] == 0
    assert counts[1] == pytest.approx(400, abs=80) and counts[3] == pytest.approx(2400, abs=120)


def test_the_race_moves_only_on_a_near_tie() -> None:
    """A resumed request recomputes its logits by prefill, a few ulps off: the draw stays."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(64, 201088, generator=gen), dim=-1)  # nearly flat rows
    nudged = probs * (1 + 1e-6 * torch.randn(64, 201088, generator=gen))
    seeds, steps = list(range(64)), [3] * 64
    assert (race(probs, seeds, steps) == race(nudged, seeds, steps)).sum() >= 63


def test_keep_top_k_per_row() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0]] * 3)
    kept = keep_top_k(x, [2, 0, 9])  # 0 and >= V: no limit
    assert kept[0].tolist() == [float("-inf"), 5.0, float("-inf"), 4.0]
    assert torch.equal(kept[1:], x[1:])


def test_a_row_draws_the_same_alone_or_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3000, generator=gen) * 2
    args = dict(temperature=[0.7, 1.3, 1.0, 0.5], top_k=[0, 50, 0, 10], top_p=[1.0, 0.9, 0.5, 1.0],
                min_p=[0.0, 0.0, 0.05, 0.0], seeds=[1, 2, 3, 4], steps=[5, 6, 7, 8])
    together, ok = draw(x, x.amax(-1), floor=EXP_FLOOR, **args)
    assert ok.all()
    for row in range(4):
        one = x[row:row + 1]
        alone, _ = draw(one, one.amax(-1), floor=EXP_FLOOR, **{k: v[row:row + 1] for k, v in args.items()})
        assert alone.item() == together[row].item()


def test_masked_tokens_are_never_drawn_and_nothing_left_is_reported() -> None:
    x = torch.full((2, 500), float("-inf"))
    x[0, [3, 400]] = 0.0  # only two tokens allowed
    picks = {draw(x[:1], x[:1].amax(-1), [5.0], [0], [1.0], [0.0], [9], [n], EXP_FLOOR)[0].item() for n in range(200)}
    assert picks == {3, 400}
    _, ok = draw(x, x.amax(-1), [1.0, 1.0], [0, 0], [1.0, 1.0], [0.0, 0.0], [1, 1], [0, 0], EXP_FLOOR)
    assert ok.tolist() == [True, False]  # row 1 has no token left


@pytest.mark.gpu
def test_cuda_draws_what_the_cpu_draws() -> None:
    """The same keys give the same bits on CUDA (integer ops: exact), and the same rows the same
    choices (the divisions and logs may round differently in the last bit, which could move a choice
    only on an exact near-tie)."""
    assert hash_bits(row_keys([7, 7, 123], [0, 3, 0], "cuda"), 0, 6).cpu().tolist() == PINNED_BITS
    assert race(torch.tensor(FOUR, device="cuda"), list(range(12)), [5] * 12).cpu().tolist() == PINNED_BY_SEED
    keys = row_keys(list(range(8)), [3] * 8, "cpu")
    assert torch.equal(uniforms(keys.cuda(), 201088).cpu(), uniforms(keys, 201088))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 50_000, generator=gen) * 4
    args = dict(temperature=[0.8] * 16, top_k=[0, 40] * 8, top_p=[1.0, 0.9, 0.5, 1.0] * 4, min_p=[0.0] * 16,
                seeds=list(range(16)), steps=[3] * 16, floor=EXP_FLOOR)
    cpu, ok_cpu = draw(x, x.amax(-1), **args)
    gpu, ok_gpu = draw(x.cuda(), x.amax(-1).cuda(), **args)
    assert gpu.device.type == "cuda" and ok_gpu.cpu().tolist() == ok_cpu.tolist()
    assert gpu.cpu().tolist() == cpu.tolist()
