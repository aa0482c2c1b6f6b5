"""The `gptoss` command line: the generate --json contract, errors, make-tiny, bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli.main import main
from model_shards.capabilities import AUTO, choose_dtype, cpu_features
from model_shards.random_checkpoint import make_tiny

PROMPT = "101,2002,30003,4004,505"


def gptoss(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("gptoss") or str(Path(sys.executable).parent / "gptoss")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_console_script_generate_json_contract(tiny_hf: Path, vocab: Path) -> None:
    run = gptoss("generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--max-tokens", "6",
                 "--temperature", "0", "--json")
    assert run.returncode == 0, run.stderr
    out = last_json(run.stdout)
    assert len(out["token_ids"]) == len(out["logprobs"]) == 6
    assert all(isinstance(t, int) for t in out["token_ids"]) and all(lp <= 0 for lp in out["logprobs"])
    assert isinstance(out["text"], str) and out["finish_reason"] == "length"
    assert out["prompt_token_ids"] == [int(x) for x in PROMPT.split(",")]
    # --dtype auto (the default) is resolved, printed at start and shown in the topology
    auto = choose_dtype(AUTO, "cpu")
    assert out["dtype"] == auto.dtype and [a["dtype"] for a in out["topology"]] == [auto.dtype]
    assert out["topology"][0]["cpu"] == cpu_features().summary()
    assert f"gptoss generate: dtype {auto.dtype} (auto: {auto.reason})" in run.stderr
    # the same through main() in-process (what the other tests use)
    again = gptoss("generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--max-tokens", "6",
                   "--temperature", "0", "--json")
    assert last_json(again.stdout)["token_ids"] == out["token_ids"]


def test_text_and_chat_prompts(tiny_hf: Path, vocab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "Hello there", "--max-tokens", "4", "--json",
                 "--seed", "1"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["prompt_token_ids"][:1] and len(out["token_ids"]) <= 4
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "What is 2 + 2?", "--chat", "--system",
                 "Be brief.", "--reasoning-effort", "low", "--max-tokens", "4", "--json", "--seed", "1"]) == 0
    chat = last_json(capsys.readouterr().out)
    assert {"reasoning", "content", "tool_calls"} <= set(chat)
    assert chat["prompt_token_ids"][-2:] == [200006, 173781]  # ends with <|start|>assistant


def test_seeded_sampling_is_reproducible_from_the_cli(tiny_hf: Path, vocab: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for _ in range(2):
        assert main(["generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--max-tokens", "8",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "123", "--json"]) == 0
        runs.append(last_json(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,201088"], "outside the vocabulary"),
    (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature"),
    (["--prompt-ids", "1,2", "--max-tokens", "0"], "max_tokens"),
])
def test_bad_requests_give_a_json_error(tiny_hf: Path, vocab: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], message: str) -> None:
    assert main(["generate", "--model", str(tiny_hf), *args, "--json"]) == 2
    captured = capsys.readouterr()
    error = last_json(captured.out)["error"]
    assert message in error["message"]
    assert "Traceback" not in captured.err


@pytest.mark.slow
def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    run = gptoss("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1", "--json")
    assert run.returncode == 2
    assert "neither an existing directory nor" in last_json(run.stdout)["error"]["message"]
    assert "Traceback" not in run.stderr


def test_make_tiny_then_generate(tmp_path: Path, vocab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --vocab-dir after the subcommand too, as the README's examples show it
    assert main(["make-tiny", str(tmp_path / "m"), "--layout", "original", "--no-mxfp4", "--seed", "4",
                 "--vocab-dir", str(vocab)]) == 0
    assert (tmp_path / "m" / "original" / "config.json").exists()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", PROMPT, "--max-tokens", "3",
                 "--temperature", "0", "--json"]) == 0
    assert len(last_json(capsys.readouterr().out.splitlines()[-1])["token_ids"]) == 3


def test_bench_prints_a_table_and_one_json_line(tiny_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tiny_hf), "--batch-sizes", "1,4", "--steps", "2", "--input-len", "8",
                 "--memory-bandwidth-gbs", "100"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["engine", "batch"]
    report = json.loads(lines[-1])
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and r["step_ms_p50"] > 0 for r in report["results"])
    assert report["roofline_batch1_tokens_per_s"] > 0 and report["machine"]["cpus"] >= 1


def greedy_local(model: Path, max_tokens: int, capsys: pytest.CaptureFixture[str]) -> tuple[list[str], dict]:
    """The float32 greedy generate arguments, and the local engine's JSON for them."""
    common = ["generate", "--model", str(model), "--prompt-ids", PROMPT, "--max-tokens", str(max_tokens),
              "--temperature", "0", "--dtype", "float32", "--json"]
    assert main(common) == 0
    return common, last_json(capsys.readouterr().out)


def test_generate_on_the_cluster_engine(ray_session, tiny_hf: Path, vocab: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    common, local = greedy_local(tiny_hf, 6, capsys)
    assert main(common + ["--engine", "cluster", "--attention-replicas", "2", "--expert-shards", "3"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["token_ids"] == local["token_ids"]
    assert max(abs(a - b) for a, b in zip(out["logprobs"], local["logprobs"])) < 1e-4
    topology = out["topology"]
    assert sorted(a["role"] for a in topology) == ["attention_replica"] * 2 + ["expert_shard"] * 3 + ["router"]
    assert len({a["pid"] for a in topology}) == 6
    assert sorted(a["experts"] for a in topology if a["role"] == "expert_shard") == [[0, 5], [5, 10], [10, 16]]


def test_cluster_engine_joins_an_existing_ray_cluster(ray_session, tiny_hf: Path, vocab: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--ray-address: a separate process puts its actors on this session's running Ray."""
    common, local = greedy_local(tiny_hf, 4, capsys)
    address = ray_session.get_runtime_context().gcs_address
    run = gptoss(*common, "--engine", "cluster", "--expert-shards", "2", "--ray-address", address)
    assert run.returncode == 0, run.stderr[-3000:]
    out = last_json(run.stdout)
    assert out["token_ids"] == local["token_ids"]
    node = ray_session.get_runtime_context().get_node_id()
    assert len(out["topology"]) == 4 and all(a["node"] == node for a in out["topology"])


def test_bench_local_and_cluster_in_one_run(ray_session, tiny_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tiny_hf), "--engine", "local,cluster", "--expert-shards", "2",
                 "--batch-sizes", "1,4", "--steps", "3", "--input-len", "8", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["engine"], r["batch_size"]) for r in report["results"]] == \
        [("local", 1), ("local", 4), ("cluster", 1), ("cluster", 4)]
    cluster_rows = [r for r in report["results"] if r["engine"] == "cluster"]
    assert all(r["moe_wait_us_per_layer"] > 0 and r["replica_us_per_layer"] > 0 and r["data_plane_us_per_layer"] is not None
               for r in cluster_rows)
    assert all(r["router_us_per_layer"] > 0 and r["shard_us_per_layer"] > 0 for r in cluster_rows)
    assert all(r["shard_imbalance"] >= 1.0 for r in cluster_rows)  # in every cluster row, as the JSON carries it
    assert [h["rows"] for h in report["hops"]] == [1, 4]
    assert all(0 < h["raw_us"] and 0 < h["framed_us"] for h in report["hops"])
    assert all(h["layer_path_us"] > 2 * h["raw_us"] for h in report["hops"])  # three hops take longer than one
    assert [o["batch_size"] for o in report["cluster_overhead"]] == [1, 4]


def test_bench_rebalances_a_skewed_model_beside_the_initial_placement(
        ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hot experts 0-3 all start on shard 0; the +eplb row runs after a rebalance by the routed load."""
    skewed = make_tiny(tmp_path / "skewed", "tiny", "hf", True, seed=0, router_skew=8.0)
    assert main(["bench", "--model", str(skewed), "--engine", "cluster", "--expert-shards", "2",
                 "--redundant-experts", "2", "--eplb-interval", "100", "--batch-sizes", "8", "--steps", "3",
                 "--input-len", "8", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["engine"]: r for r in report["results"]}
    assert sorted(rows) == ["cluster", "cluster+eplb"]
    assert rows["cluster"]["shard_imbalance"] > 1.9
    assert rows["cluster+eplb"]["shard_imbalance"] <= 1.25


def test_bad_cluster_arguments_are_clear_errors(tiny_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--engine", "cluster",
                 "--expert-shards", "17", "--json"]) == 2
    assert "between 1 and the number of experts" in last_json(capsys.readouterr().out)["error"]["message"]
    assert main(["generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--engine", "cluster",
                 "--redundant-experts", "2", "--json"]) == 2
    assert "at least 2 expert shards" in last_json(capsys.readouterr().out)["error"]["message"]
    assert main(["generate", "--model", str(tiny_hf), "--prompt-ids", PROMPT, "--engine", "nope", "--json"]) == 2
    assert "engine must be one of" in last_json(capsys.readouterr().out)["error"]["message"]
