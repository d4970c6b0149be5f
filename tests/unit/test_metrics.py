"""W&B mode resolution: offline unless a key is configured; online without a key fails before any write."""

from __future__ import annotations

import pytest

from sftdist.config import WandbConfig
from sftdist.errors import ConfigError
from sftdist.metrics import check_wandb, resolve_wandb_mode


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_auto_is_offline_without_a_key_and_online_with_one(no_key, monkeypatch):
    assert resolve_wandb_mode("auto") == "offline"
    no_key.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_online_without_a_key_is_a_config_error(no_key, monkeypatch):
    with pytest.raises(ConfigError, match="wandb.mode=online but no W&B key is configured"):
        check_wandb(WandbConfig(mode="online"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb(WandbConfig(mode="online"))
