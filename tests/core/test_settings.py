"""Flags over .env over defaults, and clear errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmm.core.settings import ConfigError, build_config

DIR = Path("/tmp/cmm-test-config")


def test_flags_win_over_env() -> None:
    env = {"DEFAULT_SOURCE_MODEL": "claude-haiku-4-5", "DEFAULT_TARGET_MODEL": "gemini-2.5-flash",
           "PROXY_URL": "https://proxy.example/v1/messages", "PROXY_API_KEY": "env-key"}
    config = build_config({"target": "gpt-5", "proxy-api-key": ""}, env, DIR)
    [mapping] = config.proxy.router.mappings
    assert (mapping.source, mapping.target) == ("claude-haiku-4-5", "gpt-5")
    assert mapping.upstream.url == "https://proxy.example/v1/messages"
    assert mapping.upstream.api_key == ""  # an explicit empty flag beats the file
    assert config.port == 443 and config.listen == ("127.0.0.1", "::1")
    assert config.hosts_file == Path("/etc/hosts") and config.log_file == DIR / "cmm.log"
    assert config.proxy.body_limit == 32 * 1024 * 1024


def test_defaults() -> None:
    config = build_config({"source": "a", "target": "b"}, {}, DIR)
    assert config.proxy.router.mappings[0].upstream.url == "http://localhost:8317/v1/messages"
    assert config.anthropic_ips == ()
    assert config.proxy.max_connections == 1024
    assert build_config({"source": "a", "target": "b", "max-connections": "64"}, {}, DIR).proxy.max_connections == 64


@pytest.mark.parametrize("options, words", [
    ({}, "give --source and --target"),
    ({"source": "a"}, "give --target"),
    ({"source": "a", "target": "b", "proxy-url": "localhost:8317"}, "http:// or https://"),
    ({"source": "a", "target": "b", "port": "http"}, "--port must be a number"),
    ({"source": "a", "target": "b", "port": "70000"}, "at most 65535"),
    ({"source": "a", "target": "b", "listen": "0.0.0.0"}, "loopback addresses only"),
    ({"source": "a", "target": "b", "listen": "10.0.0.1"}, "loopback addresses only"),
    ({"source": "a", "target": "b", "anthropic-ip": "api.anthropic.com"}, "not an IP address"),
    ({"source": "a", "target": "b", "body-limit": "0"}, "greater than 0"),
    ({"source": "a", "target": "b", "max-connections": "0"}, "--max-connections must be greater than 0"),
    ({"source": "a", "target": "b", "max-connections": "many"}, "--max-connections must be a number"),
])
def test_errors_say_what_to_fix(options: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_config(options, {}, DIR)


def test_no_hosts_and_addresses() -> None:
    config = build_config({"source": "a", "target": "b", "no-hosts": True, "anthropic-ip": "192.0.2.10, 2001:db8::10",
                           "listen": "127.0.0.1"}, {}, DIR)
    assert config.hosts_file is None
    assert config.anthropic_ips == ("192.0.2.10", "2001:db8::10")
    assert config.listen == ("127.0.0.1",)
