"""`sdexport serve` settings: flags derive from ServeConfig, limits are checked, the key's sources, Ray's plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdexport import cli
from sdexport.serve.cli import config_from
from sdexport.serve.config import API_KEY_ENV, ServeConfig, read_api_key
from sdexport.serve.ray_serve import ReplicaPlan


def test_flags_become_the_config_with_the_key_from_a_file(tmp_path: Path) -> None:
    key = tmp_path / "key.txt"
    key.write_text("  s3cret\n")
    args = cli.parser().parse_args(["serve", "build/x", "--max-queue", "8", "--max-batch", "2", "--batch-window-ms",
                                    "25", "--api-key-file", str(key), "--cors-origin", "https://a.example"])
    config = config_from(args)
    assert (config.max_queue, config.max_batch, config.batch_window_ms) == (8, 2, 25.0)
    assert config.api_key == "s3cret" and config.cors_origins == ("https://a.example",)
    assert config.host == "127.0.0.1" and "s3cret" not in repr(config)


def test_the_key_comes_from_the_environment_when_no_file_is_given(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert read_api_key() == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert read_api_key() is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read the API key file"):
        read_api_key(tmp_path / "missing")


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("max_queue", 0, "integer >= 1"), ("max_batch", -1, "integer >= 1"), ("timeout_s", 0, "> 0"),
    ("batch_window_ms", -5, ">= 0"), ("port", 70000, "0..65535"), ("max_n", 0, ">= 1"),
])
def test_bad_limits_name_the_field_and_what_is_allowed(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"{field}={value!r} is not allowed") as caught:
        ServeConfig(**{field: value})
    assert allowed in str(caught.value)


def test_a_bad_flag_value_is_a_usage_error(capsys: Any) -> None:
    assert cli.main(["serve", "build/x", "--max-queue", "0"]) == 2
    assert "max_queue=0 is not allowed" in capsys.readouterr().err


def test_replica_plan_asks_ray_for_one_gpu_per_replica_or_autoscaling_bounds() -> None:
    config = ServeConfig(max_queue=10, max_batch=4, workers=1, drain_s=12)
    fixed = ReplicaPlan(num_replicas=3).deployment_options(config)
    assert fixed == {"ray_actor_options": {"num_gpus": 1.0, "num_cpus": 1.0}, "max_ongoing_requests": 14,
                     "graceful_shutdown_timeout_s": 12, "num_replicas": 3}
    scaled = ReplicaPlan(min_replicas=1, max_replicas=8, num_gpus=0, num_cpus=0.5).deployment_options(config)
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 8
    assert "num_replicas" not in scaled and scaled["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 0.5}
    with pytest.raises(ValueError, match="both --min-replicas and --max-replicas"):
        ReplicaPlan(min_replicas=1)
    with pytest.raises(ValueError, match="min_replicas=5, max_replicas=2"):
        ReplicaPlan(min_replicas=5, max_replicas=2)
