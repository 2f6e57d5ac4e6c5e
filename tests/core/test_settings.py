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


class _Spec:
    def __init__(self, source: str, target: str, url: str | None = None, api_key: str | None = None) -> None:
        self.source, self.target, self.url, self.api_key = source, target, url, api_key


ENV_PAIR = {"DEFAULT_SOURCE_MODEL": "claude-haiku-4-5", "DEFAULT_TARGET_MODEL": "gemini-2.5-flash"}


def _pairs(options: dict, env: dict, specs: list) -> set[tuple[str, str]]:
    return {(m.source, m.target) for m in build_config(options, env, DIR, specs).proxy.router.mappings}


def test_env_pair_keeps_working_alongside_the_mappings_file() -> None:
    """The first `cmm map add` must not silently stop the .env pair from being intercepted."""
    assert _pairs({}, ENV_PAIR, []) == {("claude-haiku-4-5", "gemini-2.5-flash")}
    assert _pairs({}, ENV_PAIR, [_Spec("claude-sonnet-4", "gpt-5")]) == {
        ("claude-haiku-4-5", "gemini-2.5-flash"), ("claude-sonnet-4", "gpt-5")}


def test_mappings_file_wins_over_the_env_pair_for_the_same_source() -> None:
    assert _pairs({}, ENV_PAIR, [_Spec("claude-haiku-4-5", "gpt-5", "http://other:1/m")]) == {
        ("claude-haiku-4-5", "gpt-5")}


def test_flags_replace_the_env_pair_and_win_over_the_file() -> None:
    specs = [_Spec("claude-sonnet-4", "gpt-5"), _Spec("a", "file")]
    assert _pairs({"source": ["a"], "target": ["flag"]}, ENV_PAIR, specs) == {("a", "flag"), ("claude-sonnet-4", "gpt-5")}
    # a lone --target takes DEFAULT_SOURCE_MODEL as its partner: that is the pair, once
    assert _pairs({"target": "o3"}, ENV_PAIR, specs) == {("claude-haiku-4-5", "o3"), ("claude-sonnet-4", "gpt-5"),
                                                          ("a", "file")}


def test_half_an_env_pair_is_ignored_when_the_file_maps_something() -> None:
    assert _pairs({}, {"DEFAULT_SOURCE_MODEL": "claude-haiku-4-5"}, [_Spec("a", "b")]) == {("a", "b")}
    with pytest.raises(ConfigError, match="--target"):
        build_config({}, {"DEFAULT_SOURCE_MODEL": "claude-haiku-4-5"}, DIR, [])


def test_the_newer_settings_have_their_defaults_and_take_flags_and_env() -> None:
    plain = build_config({"source": "a", "target": "b"}, {}, DIR)
    assert (plain.proxy.keep_billing_line, plain.proxy.tunnel_idle_timeout, plain.proxy.fallback_body_max,
            plain.usage_retention_days) == (False, 900.0, 8 * 1024 * 1024, 90.0)
    flagged = build_config({"source": "a", "target": "b", "keep-billing-line": True, "tunnel-idle-timeout": "60",
                            "fallback-body-max": "0.5", "usage-retention": "7"}, {}, DIR)
    assert (flagged.proxy.keep_billing_line, flagged.proxy.tunnel_idle_timeout, flagged.proxy.fallback_body_max,
            flagged.usage_retention_days) == (True, 60.0, 512 * 1024, 7.0)
    for value, kept in (("true", True), ("YES", True), ("1", True), ("false", False), ("off", False)):
        assert build_config({"source": "a", "target": "b"}, {"KEEP_BILLING_LINE": value}, DIR).proxy.keep_billing_line \
            is kept


@pytest.mark.parametrize("option, value, words", [
    ("tunnel-idle-timeout", "0", "--tunnel-idle-timeout must be greater than 0"),
    ("tunnel-idle-timeout", "soon", "--tunnel-idle-timeout must be a number"),
    ("fallback-body-max", "-1", "--fallback-body-max must be greater than -1"),
    ("usage-retention", "0", "--usage-retention must be greater than 0"),
])
def test_the_newer_settings_refuse_what_they_cannot_use(option: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_config({"source": "a", "target": "b", option: value}, {}, DIR)
