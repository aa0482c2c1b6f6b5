"""Random checkpoints: the random model generates sensibly; `--router-skew` makes hot experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.config import EngineConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from deploy.cli.main import main
from model_shards.batch import SeqChunk, plan_step
from model_shards.config import PRESETS, preset
from model_shards.layout import HF, LAYOUTS, layer_names
from model_shards.loader import load_local_model
from model_shards.model import GptOssModel
from model_shards.random_checkpoint import checkpoint_tensors, hot_experts, make_tiny, random_weights
from model_shards.sampling import SamplingParams

SKEW = 8.0  # the documented example: every token routed to the hot experts


def greedy(model: GptOssModel, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    kv = model.new_cache(num_blocks=16)
    kv.place(0, len(prompt) + steps)
    tokens, logprobs, feed, start = [], [], prompt, 0
    for _ in range(steps):
        logits = model.forward(torch.tensor(feed), plan_step([SeqChunk(0, start, len(feed))]), kv)[0]
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(logits, -1)[token].item())
        start, feed = start + len(feed), [token]
    return tokens, logprobs


def test_random_model_does_not_collapse(tiny_hf: Path) -> None:
    model = load_local_model(str(tiny_hf), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    outs = [greedy(model, torch.randint(0, 199_998, (20,), generator=gen).tolist(), 24) for _ in range(4)]
    for tokens, _ in outs:
        assert len(set(tokens)) >= 12, tokens  # not one token over and over
    assert len({tuple(t) for t, _ in outs}) == 4  # the prompt matters
    assert all(-8.0 < lp < 0.0 for _, lps in outs for lp in lps)  # peaked but not degenerate


# -- router skew ---------------------------------------------------------------------------------

def test_zero_skew_writes_the_same_checkpoint(tmp_path: Path) -> None:
    plain = make_tiny(tmp_path / "plain", seed=3)
    zero = make_tiny(tmp_path / "zero", seed=3, router_skew=0.0)
    files = sorted(f.name for f in plain.iterdir())
    assert files == sorted(f.name for f in zero.iterdir())
    for name in files:
        assert (plain / name).read_bytes() == (zero / name).read_bytes(), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_skew_raises_only_the_hot_router_biases(layout: str) -> None:
    cfg = preset("tiny")
    plain = checkpoint_tensors(random_weights(cfg, 5), layout, as_mxfp4=False)
    skewed = checkpoint_tensors(random_weights(cfg, 5, router_skew=SKEW), layout, as_mxfp4=False)
    biases = {layer_names(layout, i)["router_b"][0]: hot for i, hot in enumerate(hot_experts(cfg, 5))}
    assert plain.keys() == skewed.keys()
    for name, t in plain.items():
        if name not in biases:
            assert torch.equal(t, skewed[name]), name
            continue
        raised = (skewed[name].float() - t.float()).abs() > 1.0  # [E]
        assert raised.nonzero().flatten().tolist() == biases[name], name
        # the bonus survives the bf16 rounding of the stored bias (its step is 1/16 near 8)
        assert torch.allclose(skewed[name].float()[raised] - t.float()[raised], torch.tensor(SKEW), atol=0.07)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hot_experts_fill_a_top_k_inside_the_first_quarter(name: str) -> None:
    cfg = preset(name)
    hot = hot_experts(cfg, seed=0)
    k, quarter = cfg.experts_per_token, max(cfg.experts_per_token, cfg.num_experts // 4)
    assert len(hot) == cfg.num_hidden_layers
    assert all(len(set(layer)) == k and max(layer) < quarter for layer in hot)
    assert hot == hot_experts(cfg, seed=0)
    if quarter > k:  # room to differ: different layers, and different seeds, get different sets
        assert len({tuple(layer) for layer in hot}) > 1
        assert hot != hot_experts(cfg, seed=1)


def test_make_tiny_cli_router_skew(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny", str(tmp_path / "m"), "--layout", "original", "--no-mxfp4", "--router-skew", "4"]) == 0
    assert "router skew 4" in capsys.readouterr().out
    bias = load_file(tmp_path / "m" / "original" / "model.safetensors")["block.0.mlp.gate.bias"].float()  # [E]
    hot = torch.zeros_like(bias, dtype=torch.bool)
    hot[hot_experts(preset("tiny"))[0]] = True
    assert bias[hot].min() > 3.0 and bias[~hot].abs().max() < 1.0  # the hot ones raised by 4, only they
    assert main(["make-tiny", str(tmp_path / "bad"), "--router-skew", "-1"]) == 2
    assert "router skew" in capsys.readouterr().err


def routed_counts(model: Path, prompts: list[list[int]]) -> torch.Tensor:
    """Greedy generation on the local engine -> routed assignments [L', E] (T*K per layer)."""
    executor = LocalExecutor(ModelSource(str(model), "float32"), KVSpec(num_blocks=256, block_size=16, max_seqs=16))
    engine = Engine(executor, EngineConfig())
    try:
        engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        engine.shutdown()
    # per layer [L, E], or summed over layers [E] in older executors: [1, E] then (same test, coarser)
    return executor.expert_tokens.reshape(-1, executor.config.num_experts).double()


def shard_imbalance(counts: torch.Tensor, shards: int) -> float:
    """counts [L, E], experts split evenly over `shards` -> sum over layers of the busiest shard's load
    over the sum of the mean shard loads (cluster/telemetry.py's overall figure)."""
    loads = counts.reshape(counts.shape[0], shards, -1).sum(-1)  # [L, M]
    return float(loads.max(-1).values.sum() / loads.mean(-1).sum())


def test_router_skew_concentrates_routed_tokens(tmp_path: Path, vocab: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 199_998, (32,), generator=gen).tolist() for _ in range(8)]
    cfg = preset("tiny")  # 16 experts, top-4: uniform is 1/16 per expert, 1/4 per quarter
    measured = {}
    for skew in (0.0, 1.0, SKEW):
        counts = routed_counts(make_tiny(tmp_path / f"s{skew:g}", "tiny", HF, True, seed=0, router_skew=skew), prompts)
        assert counts.sum() == 8 * (32 + 7) * cfg.num_hidden_layers * cfg.experts_per_token  # every assignment
        share = counts.sum(0) / counts.sum()  # [E]
        busiest_quarter = float(share.sort(descending=True).values[:4].sum())
        measured[skew] = (float(share.max()), busiest_quarter, shard_imbalance(counts, 2), shard_imbalance(counts, 4))
    # Measured (max share, busiest quarter, 2-shard and 4-shard imbalance), 4992 assignments:
    #   S=0: 0.075, 0.276, 1.04, 1.09   S=1: 0.133, 0.488, 1.31, 1.95   S=8: 0.250, 1.000, 2.00, 4.00
    top, quarter, two, four = measured[0.0]
    assert top < 0.1 and quarter < 0.35 and two < 1.15 and four < 1.25  # about even
    assert measured[1.0][1] > 0.4 and measured[1.0][2] > 1.15  # a mild bonus already shows
    top, quarter, two, four = measured[SKEW]
    assert quarter > 0.99 and top > 0.24  # the hot 4 take everything, about evenly among them
    assert two >= 2.0 - 1e-9 and four >= 4.0 - 1e-9  # one of 2 (of 4) even shards computes every assignment
