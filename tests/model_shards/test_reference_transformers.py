"""`gptoss generate` against transformers' GptOssForCausalLM (eager attention, float32) on the
same weights, stored three ways: transformers' own float save, the hub layout with MXFP4 experts,
and the `original/` layout. Prompts shorter and longer than the 128-token sliding window."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deploy.cli.main import main
from model_shards.config import preset
from model_shards.random_checkpoint import random_weights, write_checkpoint
from model_shards.weights import ModelWeights

transformers = pytest.importorskip("transformers")

STEPS = 16
PROMPT_LENGTHS = (23, 200)  # below and above the sliding window (128)


def transformers_state_dict(w: ModelWeights) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (experts as its [E, in, out] float parameters)."""
    cfg = w.config
    sd = {"model.embed_tokens.weight": w.globals.embedding, "model.norm.weight": w.globals.final_norm,
          "lm_head.weight": w.globals.unembedding.weight}
    split = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    for i in range(cfg.num_hidden_layers):
        a, r, e, p = w.attention[i], w.routers[i], w.experts[i], f"model.layers.{i}."
        for name, weight, bias in zip("qkv", torch.split(a.qkv.weight, split), torch.split(a.qkv.bias, split)):
            sd[f"{p}self_attn.{name}_proj.weight"], sd[f"{p}self_attn.{name}_proj.bias"] = weight, bias
        sd.update({
            p + "input_layernorm.weight": a.attn_norm, p + "post_attention_layernorm.weight": a.mlp_norm,
            p + "self_attn.o_proj.weight": a.out.weight, p + "self_attn.o_proj.bias": a.out.bias,
            p + "self_attn.sinks": a.sinks,
            p + "mlp.router.weight": r.weight, p + "mlp.router.bias": r.bias,
            p + "mlp.experts.gate_up_proj": e.gate_up.weight.transpose(1, 2),
            p + "mlp.experts.gate_up_proj_bias": e.gate_up_bias,
            p + "mlp.experts.down_proj": e.down.weight.transpose(1, 2),
            p + "mlp.experts.down_proj_bias": e.down_bias,
        })
    return sd


@dataclass
class Reference:
    checkpoints: dict[str, Path]  # "float" (transformers save_pretrained), "mxfp4" (hub), "original"
    prompts: list[list[int]]
    tokens: list[list[int]]  # transformers float32 greedy tokens per prompt
    logprobs: list[list[float]]


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    weights = random_weights(preset("tiny"), seed=7)
    hub = write_checkpoint(weights, root / "mxfp4", "hf", as_mxfp4=True)
    original = write_checkpoint(weights, root / "original", "original", as_mxfp4=True)
    # transformers reads our hub config.json, holds the same weights, and saves them its own way.
    config = transformers.AutoConfig.from_pretrained(hub)
    config._attn_implementation = "eager"
    if hasattr(config, "quantization_config"):  # the float copy is not MXFP4 (with triton installed,
        del config.quantization_config  # transformers would otherwise fetch MXFP4 kernels from the Hub)
    model = transformers.GptOssForCausalLM(config).eval()
    model.load_state_dict(transformers_state_dict(weights), strict=True)
    model.save_pretrained(root / "float")
    model = transformers.GptOssForCausalLM.from_pretrained(root / "float", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    results = [hf_greedy(model, p) for p in prompts]
    return Reference({"float": root / "float", "mxfp4": hub, "original": original}, prompts,
                     [r[0] for r in results], [r[1] for r in results])


def run_generate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_transformers_saved_float_weights(reference: Reference) -> None:
    names = json.loads((reference.checkpoints["float"] / "config.json").read_text())
    assert "rope_parameters" in names or "rope_scaling" in names
    assert (reference.checkpoints["float"] / "model.safetensors").exists()


@pytest.mark.parametrize("which", ["float", "mxfp4", "original"])
@pytest.mark.parametrize("prompt_index", range(len(PROMPT_LENGTHS)))
def test_greedy_float32_matches_transformers(reference: Reference, capsys: pytest.CaptureFixture[str],
                                             which: str, prompt_index: int) -> None:
    prompt = reference.prompts[prompt_index]
    out = run_generate(capsys, "--model", str(reference.checkpoints[which]), "--dtype", "float32",
                       "--temperature", "0", "--max-tokens", str(STEPS), "--ignore-eos",
                       "--prompt-ids", ",".join(map(str, prompt)))
    assert out["token_ids"] == reference.tokens[prompt_index]
    assert len(out["token_ids"]) == STEPS and out["finish_reason"] == "length"
    diff = max(abs(a - b) for a, b in zip(out["logprobs"], reference.logprobs[prompt_index]))
    assert diff < 1e-3, f"log-probs differ by {diff}"


def test_transformers_reads_our_mxfp4_files_the_same(reference: Reference) -> None:
    """transformers itself decoding our MXFP4 blocks gives its own float32 result."""
    model = transformers.GptOssForCausalLM.from_pretrained(
        reference.checkpoints["mxfp4"], dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    tokens, logprobs = hf_greedy(model, reference.prompts[1])
    assert tokens == reference.tokens[1]
    assert max(abs(a - b) for a, b in zip(logprobs, reference.logprobs[1])) < 1e-4


def test_bfloat16_within_bf16_noise(reference: Reference) -> None:
    """bfloat16, fed the float32 reference's tokens (teacher forcing), gives them log-probs close
    to float32's: the bf16 path differs by rounding, not by a wrong op."""
    from model_shards.batch import SeqChunk, plan_step
    from model_shards.loader import load_local_model

    model = load_local_model(str(reference.checkpoints["mxfp4"]), torch.bfloat16)
    for prompt, tokens, ref_logprobs in zip(reference.prompts, reference.tokens, reference.logprobs):
        kv = model.new_cache(num_blocks=32)
        kv.place(0, len(prompt) + len(tokens))
        ours, start, feed = [], 0, prompt
        for token in tokens:
            logits = model.forward(torch.tensor(feed), plan_step([SeqChunk(0, start, len(feed))]), kv)
            ours.append(torch.log_softmax(logits[0], -1)[token].item())
            start, feed = start + len(feed), [token]
        diff = (torch.tensor(ours) - torch.tensor(ref_logprobs)).abs()
        assert diff.max() < 0.2 and diff.mean() < 0.06, diff  # measured: 0.085 and 0.035
