"""Random-weight checkpoints in exactly the layout of `openai/gpt-oss-*` (`gptoss make-tiny`).

No real weights can be downloaded in CI, so every loading path is tested on these: the HF root
layout (optionally sharded with an index) or `original/`, experts in MXFP4 or as floats. Random
values are chosen so the stored checkpoints all define the SAME model: non-expert tensors are
rounded to bf16 (their stored dtype) and expert matrices to MXFP4-representable values, so writing
them as MXFP4 loses nothing. Scales keep the residual stream dominated by the token embedding and
give peaked output distributions, so the random model does not collapse onto one token.

Router skew (`make-tiny --router-skew S`): random routers spread tokens almost evenly over the
experts, which hides load imbalance between expert shards. With S > 0 each layer gets a few "hot"
experts (see `hot_experts`) whose router bias is raised by S, a logit bonus: the random router logits
have a spread of about 1 over the experts, so S = 1 is a mild preference and S >= 6 sends nearly every
token to the hot experts. S = 0 writes exactly the checkpoint of the same seed without the option.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_shards import mxfp4
from model_shards.config import GptOssConfig, preset
from model_shards.layout import HF, ORIGINAL, expert_names, global_name, layer_names
from model_shards.linear import Linear
from model_shards.weights import (AttentionWeights, DenseStack, ExpertStack, ExpertWeights, GlobalWeights,
                                  ModelWeights, Mxfp4Stack, RouterWeights)

log = logging.getLogger(__name__)


def random_weights(cfg: GptOssConfig, seed: int = 0, router_skew: float = 0.0) -> ModelWeights:
    """float32 weights whose values are exactly representable in the stored formats; `router_skew`
    is the logit bonus of each layer's hot experts (0: none, see the module docstring)."""
    if router_skew < 0 or not math.isfinite(router_skew):
        raise ValueError(f"router skew must be a finite number >= 0, got {router_skew}")
    gen = torch.Generator().manual_seed(seed)
    h, inter, e, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    qkv = cfg.q_dim + 2 * cfg.kv_dim

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16).to(torch.float32)

    def expert_matrix(n_out: int, n_in: int, std: float) -> DenseStack:
        blocks, scales = mxfp4.quantize(torch.randn(e, n_out, n_in, generator=gen) * std)
        return DenseStack(mxfp4.dequantize(blocks, scales, torch.float32))

    layers = range(cfg.num_hidden_layers)
    return ModelWeights(
        config=cfg,
        globals=GlobalWeights(
            embedding=normal(v, h, std=1.0),
            final_norm=normal(h, std=0.1, mean=1.0),
            unembedding=Linear(normal(v, h, std=4.0 / math.sqrt(h))),
        ),
        attention=[AttentionWeights(
            attn_norm=normal(h, std=0.1, mean=1.0),
            qkv=Linear(normal(qkv, h, std=1.0 / math.sqrt(h)), normal(qkv, std=0.1)),
            sinks=normal(cfg.num_attention_heads, std=1.0),
            out=Linear(normal(h, cfg.q_dim, std=0.5 / math.sqrt(cfg.q_dim)), normal(h, std=0.02)),
            mlp_norm=normal(h, std=0.1, mean=1.0),
        ) for _ in layers],
        routers=skew_routers(
            [RouterWeights(weight=normal(e, h, std=1.0 / math.sqrt(h)), bias=normal(e, std=0.1)) for _ in layers],
            hot_experts(cfg, seed), router_skew),
        experts=[ExpertWeights(
            first=0,
            gate_up=expert_matrix(2 * inter, h, 1.0 / math.sqrt(h)),
            gate_up_bias=normal(e, 2 * inter, std=0.1),
            down=expert_matrix(h, inter, 0.5 / math.sqrt(inter)),
            down_bias=normal(e, h, std=0.02),
        ) for _ in layers],
    )


def hot_experts(cfg: GptOssConfig, seed: int = 0) -> list[list[int]]:
    """[L][K] the hot experts of each layer: experts_per_token of them (a token's whole top-k fits in
    the hot set, so a large skew can route everything there), drawn per layer with the seed from the
    first quarter of the experts. The first quarter lies inside the first shard of any even split into
    up to 4 expert shards, so once the skew saturates the busiest of M <= 4 shards carries everything:
    shard imbalance (busiest over mean) M, i.e. 2.0 on 2 shards and 4.0 on 4. A balancer can still
    even it out by placing the K hot experts on different shards. (The tiny preset has 16 experts and
    K = 4: its first quarter is exactly the hot set, in every layer.)"""
    k = cfg.experts_per_token
    pool = max(k, cfg.num_experts // 4)  # the first quarter, or the K first when there are fewer than 4K
    # Its own generator, so the skew leaves every other tensor's draw (and S = 0) unchanged.
    gen = torch.Generator().manual_seed(seed + 0x5EED)
    return [sorted(torch.randperm(pool, generator=gen)[:k].tolist()) for _ in range(cfg.num_hidden_layers)]


def skew_routers(routers: list[RouterWeights], hot: list[list[int]], bonus: float) -> list[RouterWeights]:
    """Adds `bonus` to the router bias [E] of each layer's hot experts (a logit bonus, the same for every
    token); weights [E, H] are kept. Rounded to bf16 again, the stored dtype. bonus 0: unchanged."""
    if bonus == 0:
        return routers
    out = []
    for router, experts in zip(routers, hot, strict=True):
        assert router.bias is not None  # random routers always have one, as gpt-oss's do
        bias = router.bias.clone()  # [E]
        bias[experts] += bonus
        out.append(RouterWeights(weight=router.weight, bias=bias.to(torch.bfloat16).to(torch.float32)))
    return out


def _stack_tensors(stack: ExpertStack, names_blocks: str, names_scales: str, dense_name: str,
                   dense_in_out: bool, as_mxfp4: bool) -> dict[str, torch.Tensor]:
    if as_mxfp4:
        if isinstance(stack, Mxfp4Stack):
            blocks, scales = stack.blocks, stack.scales
        else:
            blocks, scales = mxfp4.quantize(stack.weight)
        return {names_blocks: blocks, names_scales: scales}
    weight = stack.weight if isinstance(stack, DenseStack) else mxfp4.dequantize(stack.blocks, stack.scales)
    weight = weight.transpose(1, 2) if dense_in_out else weight
    return {dense_name: weight.to(torch.bfloat16).contiguous()}


def checkpoint_tensors(weights: ModelWeights, layout: str, as_mxfp4: bool) -> dict[str, torch.Tensor]:
    """Name -> stored tensor (bf16, or uint8 MXFP4 blocks/scales) for one layout."""
    cfg = weights.config
    out: dict[str, torch.Tensor] = {}
    g = weights.globals
    for what, tensor in (("embedding", g.embedding), ("final_norm", g.final_norm), ("unembedding", g.unembedding.weight)):
        out[global_name(layout, what)] = tensor
    split = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    for i in range(cfg.num_hidden_layers):
        attn, router, experts = weights.attention[i], weights.routers[i], weights.experts[i]
        values = {"attn_norm": attn.attn_norm, "qkv_w": attn.qkv.weight, "qkv_b": attn.qkv.bias, "sinks": attn.sinks,
                  "out_w": attn.out.weight, "out_b": attn.out.bias, "mlp_norm": attn.mlp_norm,
                  "router_w": router.weight, "router_b": router.bias}
        for key, names in layer_names(layout, i).items():
            parts = torch.split(values[key], split) if len(names) == 3 else (values[key],)
            out.update(zip(names, parts))
        for matrix in ("gate_up", "down"):
            names = expert_names(layout, i, matrix)
            stack = experts.gate_up if matrix == "gate_up" else experts.down
            out.update(_stack_tensors(stack, names.blocks, names.scales, names.dense, names.dense_is_in_out, as_mxfp4))
            out[names.bias] = experts.gate_up_bias if matrix == "gate_up" else experts.down_bias
    return {k: (t if t.dtype == torch.uint8 else t.to(torch.bfloat16)).contiguous() for k, t in out.items()}


def _save_shards(tensors: dict[str, torch.Tensor], directory: Path, stem: str, max_shard_bytes: int | None) -> None:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], directory / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(weights: ModelWeights, out_dir: str | Path, layout: str = HF, as_mxfp4: bool = True,
                     max_shard_bytes: int | None = None) -> Path:
    """Write `weights` as a checkpoint directory; returns it."""
    root = Path(out_dir)
    cfg = weights.config
    tensors = checkpoint_tensors(weights, layout, as_mxfp4)
    if layout == HF:
        root.mkdir(parents=True, exist_ok=True)
        config = cfg.to_hf_dict()
        if as_mxfp4:
            config["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        (root / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
             "pad_token_id": 199999}, indent=2))
        _save_shards(tensors, root, "model", max_shard_bytes)
    elif layout == ORIGINAL:
        directory = root / "original"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2))
        labels = {name: ("FP4" if name.endswith(".blocks") else "UE8" if name.endswith(".scales") else "BF16")
                  for name in tensors}
        (directory / "dtypes.json").write_text(json.dumps(labels, indent=1))
        _save_shards(tensors, directory, "model", max_shard_bytes)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    log.info("wrote %s checkpoint (%s experts) to %s", layout, "MXFP4" if as_mxfp4 else "bf16", root)
    return root


def make_tiny(out_dir: str | Path, preset_name: str = "tiny", layout: str = HF, as_mxfp4: bool = True,
              seed: int = 0, max_shard_bytes: int | None = None, router_skew: float = 0.0) -> Path:
    """`gptoss make-tiny`: router_skew is the hot experts' logit bonus (0: evenly routed, as before)."""
    weights = random_weights(preset(preset_name), seed, router_skew)
    return write_checkpoint(weights, out_dir, layout, as_mxfp4, max_shard_bytes)


def default_random_model(cache_dir: str | Path | None = None, preset_name: str = "tiny", seed: int = 0) -> Path:
    """A random checkpoint made once into a cache directory (what `gptoss serve` serves when no
    model is given). Written to a temporary name and renamed, so a half-written one is never used."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "gptoss"
    target = root / f"random-{preset_name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.{os.getpid()}"
    make_tiny(staging, preset_name, HF, True, seed)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target
