"""One configuration schema: every option is a `gptoss serve` flag and a RayService application arg,
with the same default; the flags and args build the same configuration."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.options import schema
from deploy.app import AppArgs, parse_args
from deploy.cli.main import build_parser
from deploy.config import APP_GROUPS, AppConfig
from deploy.cli.flags import flag_name, read_options

OPTIONS = schema(*APP_GROUPS)
NEW_FLAGS = ["--block-size", "--max-restarts", "--recovery-timeout", "--max-attempts", "--placement-strategy",
             "--ring-mb", "--layout", "--api-key-env", "--ingress-num-cpus", "--no-prefix-caching"]


def serve_flags() -> dict[str, str]:
    """dest -> flag string of every option of `gptoss serve`."""
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return {a.dest: a.option_strings[0] for a in serve._actions if a.option_strings}


def test_every_option_is_a_serve_flag_and_an_app_arg() -> None:
    flags = serve_flags()
    assert len(OPTIONS) > 30
    for o in OPTIONS:
        assert flags.get(o.name) == flag_name(o.name), o.name
        assert o.name in AppArgs.model_fields, o.name


def test_defaults_agree_between_flags_args_and_schema() -> None:
    from_flags = AppConfig.from_options(read_options(build_parser().parse_args(["serve"]), APP_GROUPS))
    from_args = parse_args({}).config()
    assert from_flags == from_args == AppConfig()
    for o in OPTIONS:
        arg_default = AppArgs.model_fields[o.name].get_default(call_default_factory=True)
        assert (tuple(arg_default) if isinstance(arg_default, list) else arg_default) == o.default, o.name
        assert from_flags.options()[o.name] == o.default, o.name


def test_the_same_settings_both_ways() -> None:
    argv = ["serve", "--block-size", "32", "--max-restarts", "2", "--recovery-timeout", "90", "--max-attempts", "5",
            "--placement-strategy", "SPREAD", "--ring-mb", "16", "--expert-split", "4,9", "--expert-shards", "3",
            "--expert-shard-resources", '{"gptoss_experts": 1}', "--api-key", "sk-x", "--request-timeout", "30"]
    from_flags = AppConfig.from_options(read_options(build_parser().parse_args(argv), APP_GROUPS))
    from_args = parse_args({"block_size": 32, "max_restarts": 2, "recovery_timeout_s": 90.0, "max_attempts": 5,
                            "placement_strategy": "SPREAD", "ring_mb": 16, "expert_split": [4, 9], "expert_shards": 3,
                            "expert_shard_resources": {"gptoss_experts": 1.0}, "api_key": "sk-x",
                            "request_timeout_s": 30.0}).config()
    assert from_flags == from_args
    assert from_flags.engine.block_size == 32 and from_flags.cluster.recovery_timeout_s == 90.0
    assert from_flags.cluster.expert_split == (4, 9) and from_flags.server.api_key == "sk-x"


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "block_size must be >= 1"),
    (["--placement-strategy", "ANYWHERE"], "placement_strategy must be one of"),
    (["--kv-cache-tokens", "8", "--block-size", "16"], "must hold at least one block"),
])
def test_bad_values_are_named_once_for_both(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppConfig.from_options(read_options(build_parser().parse_args(["serve", *argv]), APP_GROUPS))


@pytest.mark.slow
def test_serve_help_shows_every_flag() -> None:
    exe = shutil.which("gptoss") or str(Path(sys.executable).parent / "gptoss")
    run = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for flag in NEW_FLAGS + [flag_name(o.name) for o in OPTIONS]:
        assert flag in run.stdout, flag
    assert "(default: 16)" in run.stdout  # defaults shown, from the schema
