"""``twistd cmm`` option parsing: .env defaults, SUDO_USER's config dir, clear usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from cmm.daemon.tap import Options, makeService


def parse(args: list[str], environ: dict[str, str], **collaborators: object) -> Options:
    options = Options(environ=environ, **collaborators)
    options.parseOptions(args)
    return options


def test_defaults_come_from_the_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DEFAULT_SOURCE_MODEL=claude-haiku-4-5\nDEFAULT_TARGET_MODEL=gemini-2.5-flash\n"
                                   "PROXY_API_KEY=sk-file\n")
    config = parse(["--config-dir", str(tmp_path)], {}).config
    [mapping] = config.proxy.router.mappings
    assert (mapping.source, mapping.target, mapping.upstream.api_key) == ("claude-haiku-4-5", "gemini-2.5-flash", "sk-file")


def test_config_dir_of_the_sudo_user(tmp_path: Path) -> None:
    config = parse(["--source", "a", "--target", "b"], {"SUDO_USER": "alice", "HOME": "/root"},
                   home_of=lambda name: tmp_path / name).config
    assert config.config_dir == tmp_path / "alice" / ".cmm"


def test_missing_mapping_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="give --source and --target"):
        parse(["--config-dir", str(tmp_path)], {})


def test_bad_env_value_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PROXY_URL=localhost:8317\n")
    with pytest.raises(usage.UsageError, match="http:// or https://"):
        parse(["--config-dir", str(tmp_path), "--source", "a", "--target", "b"], {})


def test_help_lists_the_interface_options() -> None:
    text = str(Options(environ={}))
    for name in ("--source", "--target", "--proxy-url", "--proxy-api-key", "--port", "--config-dir", "--anthropic-ip",
                 "--max-connections"):
        assert name in text


def test_the_connection_cap_reaches_the_serving_settings(tmp_path: Path) -> None:
    base = ["--config-dir", str(tmp_path), "--source", "a", "--target", "b"]
    assert parse([*base, "--max-connections", "200"], {}).config.proxy.max_connections == 200
    assert parse(base, {}).config.proxy.max_connections == 1024


def test_the_service_reads_the_command_line_and_the_dir_again_on_reload(tmp_path: Path) -> None:
    options = parse(["--config-dir", str(tmp_path), "--source", "a", "--target", "b", "--port", "8443"], {})
    service = makeService(options)
    assert service.config is options.config and service.user_dir is options.user_dir
    (tmp_path / "mappings.toml").write_text("[[mapping]]\nsource = 'c'\ntarget = 'd'\n")
    assert service.user_dir is not None
    again = service.load_config(service.user_dir)
    assert [m.source for m in again.proxy.router.mappings] == ["a", "c"] and again.port == 8443
