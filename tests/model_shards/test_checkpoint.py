from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_shards.checkpoint import Checkpoint, CheckpointError, detect_layout
from model_shards.config import preset
from model_shards.random_checkpoint import random_weights, write_checkpoint
from model_shards.weights import Mxfp4Stack, load_attention, load_experts, load_model

CFG = preset("tiny")
WEIGHTS = random_weights(CFG, seed=2)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "hf": write_checkpoint(WEIGHTS, root / "hf", "hf", True),
        "hf-sharded": write_checkpoint(WEIGHTS, root / "hf-sharded", "hf", True, max_shard_bytes=20_000_000),
        "hf-float": write_checkpoint(WEIGHTS, root / "hf-float", "hf", False),
        "original": write_checkpoint(WEIGHTS, root / "original", "original", True),
        "original-float": write_checkpoint(WEIGHTS, root / "original-float", "original", False),
    }


def _all_tensors(directory: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_shape(), s.get_dtype())
    return out


def test_hub_layout_names_shapes_and_dtypes(layouts: dict[str, Path]) -> None:
    tensors = _all_tensors(layouts["hf"])
    assert len(tensors) == CFG.num_hidden_layers * 19 + 3  # 459 for gpt-oss-20b
    e, h, i = CFG.num_experts, CFG.hidden_size, CFG.intermediate_size
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ([e, 2 * i, h // 32, 16], "U8")
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] == ([e, 2 * i, h // 32], "U8")
    assert tensors["model.layers.0.mlp.experts.down_proj_blocks"] == ([e, h, i // 32, 16], "U8")
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == ([CFG.q_dim, h], "BF16")
    assert tensors["model.layers.0.self_attn.sinks"] == ([CFG.num_attention_heads], "BF16")
    assert tensors["lm_head.weight"] == ([CFG.vocab_size, h], "BF16")
    config = json.loads((layouts["hf"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"


def test_original_layout_names(layouts: dict[str, Path]) -> None:
    tensors = _all_tensors(layouts["original"] / "original")
    assert len(tensors) == CFG.num_hidden_layers * 15 + 3  # 363 for gpt-oss-20b
    assert tensors["block.0.attn.qkv.weight"] == ([CFG.q_dim + 2 * CFG.kv_dim, CFG.hidden_size], "BF16")
    assert tensors["block.1.mlp.mlp1_weight.blocks"][1] == "U8"
    labels = json.loads((layouts["original"] / "original" / "dtypes.json").read_text())
    assert labels["block.1.mlp.mlp1_weight.blocks"] == "FP4" and labels["block.1.mlp.mlp2_weight.scales"] == "UE8"
    assert detect_layout(layouts["original"]) == "original"
    assert detect_layout(layouts["original"] / "original") == "original"  # pointed at directly
    assert detect_layout(layouts["hf"]) == "hf"


@pytest.mark.parametrize("name", ["hf-sharded", "hf-float", "original", "original-float"])
def test_every_layout_loads_the_same_model(layouts: dict[str, Path], name: str) -> None:
    with Checkpoint(layouts["hf"]) as a, Checkpoint(layouts[name]) as b:
        assert a.config == b.config
        wa, wb = load_model(a, torch.float32), load_model(b, torch.float32)
    for x, y in ((wa.globals.embedding, wb.globals.embedding), (wa.attention[1].qkv.weight, wb.attention[1].qkv.weight),
                 (wa.attention[3].sinks, wb.attention[3].sinks), (wa.routers[2].bias, wb.routers[2].bias),
                 (wa.experts[1].gate_up.weight, wb.experts[1].gate_up.weight),
                 (wa.experts[3].down.weight, wb.experts[3].down.weight)):
        assert torch.equal(x, y)
    assert torch.equal(wa.experts[0].gate_up.weight, WEIGHTS.experts[0].gate_up.weight)  # MXFP4 lost nothing


def test_sharded_files_have_an_index(layouts: dict[str, Path]) -> None:
    index = json.loads((layouts["hf-sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_slices(layouts: dict[str, Path]) -> None:
    with Checkpoint(layouts["hf"]) as ckpt:
        full = load_experts(ckpt, torch.float32)
        part = load_experts(ckpt, torch.float32, experts=(3, 7), layers=range(1, 3))
        packed = load_experts(ckpt, torch.bfloat16, experts=(3, 7), layers=range(1, 2), keep_mxfp4=True)
        attention = load_attention(ckpt, torch.float32, layers=range(2, 4))
    assert len(part) == 2 and part[0].first == 3 and part[0].count == 4 and part[0].stop == 7
    assert torch.equal(part[0].gate_up.weight, full[1].gate_up.weight[3:7])
    assert torch.equal(part[1].down_bias, full[2].down_bias[3:7])
    assert isinstance(packed[0].gate_up, Mxfp4Stack)
    assert torch.equal(packed[0].gate_up.matrix(2, torch.float32), full[1].gate_up.weight[5])
    assert len(attention) == 2


def test_errors_say_what_is_wrong(layouts: dict[str, Path], tmp_path: Path) -> None:
    with Checkpoint(layouts["hf"]) as ckpt:
        with pytest.raises(CheckpointError, match=r"experts \[5, 40\) outside"):
            load_experts(ckpt, torch.float32, experts=(5, 40))
        with pytest.raises(CheckpointError, match="outside"):
            load_attention(ckpt, torch.float32, layers=range(2, 9))
        with pytest.raises(CheckpointError, match="not in the checkpoint"):
            ckpt.read("model.layers.99.self_attn.sinks")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(CheckpointError, match="neither"):
        Checkpoint(tmp_path)
    # a tensor of the wrong shape for the config
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt, pytest.raises(CheckpointError, match=r"has shape \(3, 3\), expected"):
        load_model(ckpt, torch.float32)


def test_index_naming_missing_files(layouts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((layouts["hf"] / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names files that are not there"):
        Checkpoint(tmp_path)


def test_reader_agrees_with_safetensors(layouts: dict[str, Path]) -> None:
    with Checkpoint(layouts["hf-sharded"]) as ckpt:
        for path in layouts["hf-sharded"].glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    expected = f.get_tensor(name)
                    assert torch.equal(ckpt.read(name), expected), name
                    if expected.shape[0] > 3:
                        assert torch.equal(ckpt.read(name, rows=(1, 3)), expected[1:3]), name
