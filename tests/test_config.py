"""worker.toml under PUSHFW_* variables: precedence, errors, check-config, masking."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from pushfw.worker import config
from pushfw.worker.backends import choose_backend
from pushfw.worker.config import ConfigInvalid, load, mask_url, masked, secrets_of
from pushfw.worker.settings import WorkerSettings
from tests.conftest import RedisServer
from tests.daemon import cli, worker_env

EXAMPLE = Path(__file__).parent.parent / "systemd" / "worker.toml.example"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PUSHFW_* from the caller, and a default path that does not exist."""
    for name in list(os.environ):
        if name.upper().startswith("PUSHFW_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent" / "worker.toml")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_env_beats_file_beats_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "worker.toml",
        'redis_url = "redis://redis.example:6380/2"\n'
        "batch_size = 100\n"
        'hooks = ["INPUT", "FORWARD"]\n'
        'host_labels = "web,eu"\n'
        "expiry_events = false\n",
    )
    monkeypatch.setenv("PUSHFW_BATCH_SIZE", "42")
    loaded = load(path)
    settings = loaded.settings
    assert settings.batch_size == 42, "env wins over the file"
    assert settings.redis_url == "redis://redis.example:6380/2", "the file wins over defaults"
    assert settings.hook_chains == ("INPUT", "FORWARD"), "a TOML array is a list setting"
    assert settings.labels == frozenset({"web", "eu"}), "so is a comma-separated string"
    assert settings.expiry_events is False
    assert settings.block_ms == 1000, "defaults fill the rest"
    assert loaded.source("batch_size") == "env PUSHFW_BATCH_SIZE"
    assert loaded.source("redis_url") == "file"
    assert loaded.source("block_ms") == "default"


def test_missing_default_file_is_fine_and_an_existing_one_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load()
    assert loaded.path is None
    assert loaded.settings.batch_size == 500
    default = write(tmp_path / "default.toml", "batch_size = 7\n")
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    assert load().settings.batch_size == 7
    assert load().path == default


def test_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load(tmp_path / "nope.toml")
    assert info.value.lines == [f"{tmp_path / 'nope.toml'}: no such file"]


def test_every_problem_gets_one_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "worker.toml",
        'batch_size = 0\nbacth_size = 3\nhooks = ["INPUT", 3]\nmetrics_listen = "9477"\n',
    )
    with pytest.raises(ConfigInvalid) as info:
        load(path)
    lines = info.value.lines
    assert lines[0] == f"{path}: bacth_size: unknown key (did you mean batch_size?)"
    assert f"{path}: batch_size: Input should be greater than or equal to 1" in lines
    assert any(line.startswith(f"{path}: hooks: ") for line in lines)
    assert any(line.startswith(f"{path}: metrics_listen: ") for line in lines)
    assert len(lines) == 4


def test_a_bad_variable_is_named_as_a_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "worker.toml", "batch_size = 10\n")
    monkeypatch.setenv("PUSHFW_BATCH_SIZE", "lots")
    with pytest.raises(ConfigInvalid) as info:
        load(path)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith("PUSHFW_BATCH_SIZE: Input should be a valid integer")


def test_cli_invalid_file_exits_2_with_one_line_per_key(tmp_path: Path) -> None:
    path = write(tmp_path / "worker.toml", 'batch_size = 0\nblock_ms = "soon"\nfoo = 1\n')
    for args in (["check-config"], ["run"]):
        result = cli(*args, env=worker_env(path))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.splitlines() == [
            f"pushfw-worker: {path}: foo: unknown key (see check-config for the keys)",
            f"pushfw-worker: {path}: batch_size: Input should be greater than or equal to 1",
            f"pushfw-worker: {path}: block_ms: Input should be a valid integer, "
            "unable to parse string as an integer",
        ]


def test_cli_not_toml_or_missing_file_exits_2(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", "batch_size = \n")
    result = cli("check-config", env=worker_env(broken))
    assert result.returncode == 2
    assert re.fullmatch(rf"pushfw-worker: {broken}: .*\(at line 1, column 14\)\n", result.stderr)
    missing = tmp_path / "missing.toml"
    for env, args in [
        (worker_env(missing), ["check-config"]),
        (worker_env(broken), ["--config", str(missing), "check-config"]),
    ]:
        result = cli(*args, env=env)
        assert result.returncode == 2
        assert result.stderr == f"pushfw-worker: {missing}: no such file\n"


def test_check_config_prints_the_effective_settings_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path / "worker.toml",
        'redis_url = "redis://pushfw:s3cret@redis.example:6379/0?password=s3cret"\n'
        'host_labels = ["web", "eu"]\n',
    )
    env = worker_env(path, batch_size="64", host_name="web1", hmac_key="k" * 16 + "-topsecret")
    table = cli("check-config", env=env)
    assert table.returncode == 0, table.stderr
    assert "s3cret" not in table.stdout + table.stderr
    assert "topsecret" not in table.stdout + table.stderr
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()[1:]}
    assert rows["KEY"] == ["VALUE", "SOURCE"]
    assert rows["redis_url"] == [
        "redis://pushfw:***@redis.example:6379/0?password=***",
        "file",
    ]
    assert rows["batch_size"] == ["64", "env", "PUSHFW_BATCH_SIZE"]
    assert rows["host_labels"] == ["web,eu", "file"]
    assert rows["block_ms"] == ["1000", "default"]
    assert rows["hmac_key"] == ["***", "env", "PUSHFW_HMAC_KEY"]
    assert set(rows) - {"KEY", "#"} == set(WorkerSettings.model_fields)

    as_json = cli("check-config", "--json", env=env)
    doc = json.loads(as_json.stdout)
    assert doc["file"] == str(path)
    assert doc["settings"]["redis_url"] == "redis://pushfw:***@redis.example:6379/0?password=***"
    assert doc["settings"]["batch_size"] == 64
    assert doc["sources"]["batch_size"] == "env PUSHFW_BATCH_SIZE"
    assert "s3cret" not in as_json.stdout
    assert "topsecret" not in as_json.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p%40ss@h/0", "redis://user:***@h/0"),
        ("rediss://user@h/0", "rediss://user@h/0"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        (
            "redis+sentinel://u:pw@h1:26379,h2/mymaster/0",
            "redis+sentinel://u:***@h1:26379,h2/mymaster/0",
        ),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_secrets_are_named_and_masked() -> None:
    settings = WorkerSettings(redis_url="redis://u:p%40ssword@h/0", host_name="h1")
    assert secrets_of(settings) == ["p%40ssword", "p@ssword"]
    signing = WorkerSettings(host_name="h1", hmac_key="0123456789abcdef")
    assert secrets_of(signing) == ["0123456789abcdef"]
    assert masked(signing)["hmac_key"] == "***"
    assert masked(settings)["redis_url"] == "redis://u:***@h/0"
    assert masked(settings)["key_prefix"] == "{pushfw}", "a key prefix is no secret"
    assert config.is_secret("hmac_key") and config.is_secret("redis_password")


def test_example_file_has_every_key_and_uncommented_is_valid(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    keys = re.findall(r"^# (\w+) = ", text, flags=re.MULTILINE)
    assert sorted(keys) == sorted(WorkerSettings.model_fields), "every key, each once"
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    loaded = load(write(tmp_path / "worker.toml", uncommented))
    defaults = WorkerSettings(host_name="web1")
    assert loaded.settings == defaults, "the example shows the defaults"


def test_configuration_reference_has_every_key() -> None:
    reference = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(PUSHFW_\w+)` \|", reference, flags=re.MULTILINE)
    assert sorted(rows) == sorted((k, f"PUSHFW_{k.upper()}") for k in WorkerSettings.model_fields)


def test_settings_renamed_with_their_unit_still_work_under_the_old_names(tmp_path: Path) -> None:
    path = write(tmp_path / "worker.toml", "heartbeat_interval = 2.5\nreconcile_interval = 60\n")
    env = worker_env(path, trim_interval="7", reconcile_interval_s="90")
    result = cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["heartbeat_interval_s"] == ["2.5", "file"]
    assert rows["trim_interval_s"] == ["7.0", "env", "PUSHFW_TRIM_INTERVAL"]
    assert rows["reconcile_interval_s"] == ["90", "env", "PUSHFW_RECONCILE_INTERVAL_S"], "new wins"
    assert "heartbeat_interval is now heartbeat_interval_s; the old name still works" in (
        result.stderr
    )
    assert "PUSHFW_TRIM_INTERVAL is now PUSHFW_TRIM_INTERVAL_S" in result.stderr
    assert "unknown key" not in result.stderr


def test_check_config_names_the_backend_auto_picks_here_as_the_worker_does(
    tmp_path: Path,
) -> None:
    env = worker_env(write(tmp_path / "worker.toml", ""), host_name="web1")
    picked, why = choose_backend()
    table = cli("check-config", env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[-1] == f"# backend auto: {picked} ({why})"
    if os.geteuid() == 0 and shutil.which("nft"):
        assert picked == "nftables" and why == "libnftables works here"
    as_json = json.loads(cli("check-config", "--json", env=env).stdout)
    assert as_json["backend"] == {"name": picked, "why": why}
    assert "redis" not in as_json, "no connection is tried without --connect"

    explicit = cli("check-config", env={**env, "PUSHFW_BACKEND": "ipset"})
    assert explicit.stdout.splitlines()[-1] == "# backend: ipset (configured)"


def test_check_config_connect_reaches_redis_or_says_why_and_exits_1(
    tmp_path: Path, redis_server: RedisServer, r: redis.Redis
) -> None:
    def check(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        path = write(tmp_path / "worker.toml", f'redis_url = "{url}"\n')
        return cli("check-config", "--connect", *args, env=worker_env(path, host_name="web1"))

    reached = check(redis_server.url)
    assert reached.returncode == 0, reached.stderr
    assert reached.stdout.splitlines()[-1] == f"# redis: {redis_server.url} answers PING"
    doc = json.loads(check(redis_server.url, "--json").stdout)
    assert doc["redis"] == {"reachable": True, "error": None}

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = check(f"redis://127.0.0.1:{port}/0")
    assert down.returncode == 1
    assert down.stderr.strip() == (
        f"pushfw-worker: redis: cannot reach redis://127.0.0.1:{port}/0: "
        f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."
    )
    assert "# redis:" not in down.stdout, "the settings are printed, no success line"

    r.acl_setuser("checker", enabled=True, passwords=["+right-pw"], commands=["+@all"], keys=["*"])
    try:
        wrong = f"redis://checker:wrong-pw@127.0.0.1:{redis_server.port}/0"
        refused = check(wrong, "--json")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["redis"] == {
            "reachable": False,
            "error": "invalid username-password pair or user is disabled.",
        }
        assert refused.stderr.strip() == (
            f"pushfw-worker: redis: cannot reach redis://checker:***@127.0.0.1:"
            f"{redis_server.port}/0: invalid username-password pair or user is disabled."
        )
        assert "wrong-pw" not in refused.stdout + refused.stderr
        right = check(f"redis://checker:right-pw@127.0.0.1:{redis_server.port}/0")
        assert right.returncode == 0, right.stderr

        # a bad setting beside it: 2, and no connection is tried
        path = write(tmp_path / "worker.toml", f'redis_url = "{wrong}"\nbatch_size = 0\n')
        bad = cli("check-config", "--connect", env=worker_env(path, host_name="web1"))
        assert bad.returncode == 2 and "batch_size" in bad.stderr
        assert "cannot reach" not in bad.stderr
    finally:
        r.acl_deluser("checker")
