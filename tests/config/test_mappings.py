"""The mappings file: parsing with precise errors, a writer that round-trips, edits, 0600 saves, `cmm map`."""

from __future__ import annotations

import io
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmm.cli import main as cli
from cmm.config.userfiles import UserDir
from cmm.config.mappings import (
    MappingsError,
    MappingSpec,
    add_mapping,
    format_mappings,
    load,
    mappings_file,
    parse_mappings,
    remove_mapping,
    save,
    to_router_mappings,
    toml_string,
)
from cmm.core.router import DEFAULT_PROXY_URL

SAMPLE = """\
# cmm mappings: requests whose model starts with `source` go to `url` as `target`.
[[mapping]]
source = "claude-haiku-4-5"
target = "gemini-2.5-flash"
# url = "http://localhost:8317/v1/messages"   # optional: default PROXY_URL from .env

[[mapping]]
source = "claude-sonnet-4"
target = "gpt-5"
url = "https://other.example/v1/messages"
api_key = "sk-..."
"""

HAIKU = MappingSpec("claude-haiku-4-5", "gemini-2.5-flash")
SONNET = MappingSpec("claude-sonnet-4", "gpt-5", "https://other.example/v1/messages", "sk-...")


def problems(text: str) -> str:
    with pytest.raises(MappingsError) as caught:
        parse_mappings(text, "m.toml")
    return str(caught.value)


# --- parsing --------------------------------------------------------------------------------------


def test_parse_documented_sample() -> None:
    assert parse_mappings(SAMPLE) == (HAIKU, SONNET)


def test_empty_file_and_empty_array_have_no_mappings() -> None:
    assert parse_mappings("") == ()
    assert parse_mappings("# nothing yet\n") == ()
    assert parse_mappings("mapping = []\n") == ()


def test_empty_api_key_is_kept_apart_from_no_key() -> None:
    [spec] = parse_mappings('[[mapping]]\nsource = "a"\ntarget = "b"\napi_key = ""\n')
    assert spec.api_key == ""


def test_toml_syntax_error_has_origin_line_and_column() -> None:
    message = problems('[[mapping]]\nsource = "a"\ntarget = \n')
    assert message.startswith("m.toml: not valid TOML:")
    assert "line 3" in message and "column" in message


def test_unknown_key_lists_valid_ones_and_suggests() -> None:
    message = problems('[[mapping]]\nsource = "a"\ntaget = "b"\ntarget = "c"\n')
    assert message == (
        "m.toml: mapping #1 (source 'a'): unknown key 'taget' (did you mean 'target'?); "
        "valid keys: source, target, url, api_key, request_class, header, min_body_bytes, mode, fallback_on, "
        "on_target_error"
    )


def test_missing_source_and_target() -> None:
    message = problems('[[mapping]]\nsource = "a"\ntarget = "b"\n\n[[mapping]]\nurl = "http://x/"\n')
    assert message.splitlines() == ["m.toml: mapping #2: source is missing", "m.toml: mapping #2: target is missing"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("source", '""'), ("source", '"claude haiku"'), ("target", '"gemini\\t2"'), ("target", '"a\\u0000b"')],
)
def test_empty_or_whitespace_names(field: str, value: str) -> None:
    entry = {"source": '"a"', "target": '"b"', field: value}
    text = "[[mapping]]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items())
    message = problems(text)
    assert message.startswith("m.toml: mapping #1")
    assert f"{field} must be a non-empty name without whitespace" in message


def test_duplicate_sources_name_both_entries() -> None:
    text = '[[mapping]]\nsource = "a"\ntarget = "b"\n' * 2
    assert problems(text) == "m.toml: mapping #2 (source 'a'): the same source as mapping #1; keep one of them"


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "localhost:8317", "http:///v1/messages", "http://host:99999/", "http://[::1"]
)
def test_bad_urls_are_caught_with_the_router_rule(url: str) -> None:
    message = problems(f'[[mapping]]\nsource = "a"\ntarget = "b"\nurl = {toml_string(url)}\n')
    assert message.startswith("m.toml: mapping #1 (source 'a'): url is not usable:")


def test_url_with_whitespace_is_refused() -> None:
    text = '[[mapping]]\nsource = "a"\ntarget = "b"\nurl = "http://h/ x"\n'
    assert "url must not contain whitespace" in problems(text)


def test_non_string_values() -> None:
    message = problems('[[mapping]]\nsource = "a"\ntarget = "b"\napi_key = 1234\nurl = ["http://x"]\n')
    assert message.splitlines() == [
        "m.toml: mapping #1 (source 'a'): api_key must be a string, not an integer",
        "m.toml: mapping #1 (source 'a'): url must be a string, not an array",
    ]


def test_api_key_with_a_line_break_cannot_inject_headers() -> None:
    assert "api_key must not contain whitespace" in problems(
        '[[mapping]]\nsource = "a"\ntarget = "b"\napi_key = "k\\r\\nX-Evil: 1"\n'
    )


def test_top_level_keys_other_than_mapping() -> None:
    message = problems('mappings = 1\n[[mapping]]\nsource = "a"\ntarget = "b"\n')
    assert message == "m.toml: unknown top-level key 'mappings'; the file holds only [[mapping]] entries"


def test_single_bracket_table_explains_the_fix() -> None:
    assert "write [[mapping]] (two brackets)" in problems('[mapping]\nsource = "a"\ntarget = "b"\n')


def test_every_problem_is_reported_at_once_with_right_numbers() -> None:
    text = (
        'top = 1\n'
        '[[mapping]]\nsource = "a"\ntargte = "b"\n'
        '[[mapping]]\nsource = "ok"\ntarget = "fine"\n'
        '[[mapping]]\nsource = "c"\ntarget = "d e"\n'
        '[[mapping]]\nsource = "ok"\ntarget = "again"\n'
    )
    lines = problems(text).splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("m.toml: unknown top-level key 'top'")
    assert lines[1].startswith("m.toml: mapping #1 (source 'a'): unknown key 'targte'")
    assert lines[2] == "m.toml: mapping #1 (source 'a'): target is missing"
    assert lines[3].startswith("m.toml: mapping #3 (source 'c'): target must be")
    assert lines[4] == "m.toml: mapping #4 (source 'ok'): the same source as mapping #2; keep one of them"


# --- writing --------------------------------------------------------------------------------------

_NAME_CHARS = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))
names = st.text(_NAME_CHARS, min_size=1, max_size=20).filter(
    lambda s: s.isprintable() and not any(c.isspace() for c in s)
)
targets = names.filter(lambda s: s != "*")  # "*" is a source's wildcard, never a model to ask for
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["localhost", "127.0.0.1", "[::1]", "proxy.example", "xn--bcher-kva.example"]),
    st.sampled_from(["", ":8317", ":443"]),
    st.sampled_from(["", "/", "/v1/messages", "/a/b?x=1&y=%22"]),
)
specs = st.lists(
    st.builds(MappingSpec, names, targets, st.none() | urls, st.none() | st.just("") | names),
    max_size=6,
    unique_by=lambda spec: spec.source,
)


@given(specs)
def test_parse_format_round_trip(values: list[MappingSpec]) -> None:
    text = format_mappings(values)
    assert text.startswith("# cmm mappings:")
    assert parse_mappings(text) == tuple(values)


@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_toml_string_holds_any_text(value: str) -> None:
    assert tomllib.loads(f"v = {toml_string(value)}\n") == {"v": value}


def test_format_shape() -> None:
    text = format_mappings([HAIKU, SONNET])
    assert text.endswith(
        '[[mapping]]\nsource = "claude-haiku-4-5"\ntarget = "gemini-2.5-flash"\n\n'
        '[[mapping]]\nsource = "claude-sonnet-4"\ntarget = "gpt-5"\n'
        'url = "https://other.example/v1/messages"\napi_key = "sk-..."\n'
    )


def test_format_refuses_what_parse_would_refuse() -> None:
    with pytest.raises(MappingsError, match="same source"):
        format_mappings([HAIKU, HAIKU])
    with pytest.raises(MappingsError, match="source must be"):
        format_mappings([MappingSpec("", "b")])


# --- editing --------------------------------------------------------------------------------------


def test_add_appends_a_new_source() -> None:
    assert add_mapping((HAIKU,), SONNET) == (HAIKU, SONNET)


def test_add_replaces_the_same_source_in_place() -> None:
    new = MappingSpec("claude-haiku-4-5", "gpt-5-mini", "http://localhost:9000/v1/messages")
    assert add_mapping((HAIKU, SONNET), new) == (new, SONNET)


def test_add_refuses_an_unusable_spec() -> None:
    with pytest.raises(MappingsError, match="url is not usable"):
        add_mapping((), MappingSpec("a", "b", "ftp://x/"))


def test_remove() -> None:
    assert remove_mapping((HAIKU, SONNET), "claude-haiku-4-5") == (SONNET,)
    with pytest.raises(MappingsError, match=r"no mapping with source 'claude' \(sources: 'claude-sonnet-4'\)"):
        remove_mapping((SONNET,), "claude")


def test_router_mappings_use_env_defaults_where_a_spec_has_none() -> None:
    empty_key = MappingSpec("claude-opus", "o3", api_key="")
    haiku, sonnet, opus = to_router_mappings((HAIKU, SONNET, empty_key), DEFAULT_PROXY_URL, "env-key")
    assert (haiku.upstream.url, haiku.upstream.api_key) == (DEFAULT_PROXY_URL, "env-key")
    assert (sonnet.upstream.host, sonnet.upstream.port, sonnet.upstream.api_key) == ("other.example", 443, "sk-...")
    assert opus.upstream.api_key == ""


# --- the file -------------------------------------------------------------------------------------


def test_load_missing_file_is_no_mappings(tmp_path: Path) -> None:
    assert load(tmp_path / "nope" / "mappings.toml") == ()


def test_load_names_the_path_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "mappings.toml"
    path.write_text('[[mapping]]\nsource = "a"\n')
    with pytest.raises(MappingsError, match=f"^{path}: mapping #1 \\(source 'a'\\): target is missing$"):
        load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MappingsError, match="not UTF-8"):
        load(path)


def test_save_is_0600_in_a_0700_directory_and_loads_back(tmp_path: Path) -> None:
    path = mappings_file(tmp_path / ".cmm")
    save(UserDir.open(path.parent), (HAIKU, SONNET))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load(path) == (HAIKU, SONNET)
    assert [p.name for p in path.parent.iterdir()] == ["mappings.toml"]  # no temporary left


def test_save_of_unusable_specs_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "mappings.toml"
    save(UserDir.open(tmp_path), (HAIKU,))
    before = path.read_bytes()
    with pytest.raises(MappingsError):
        save(UserDir.open(tmp_path), (HAIKU, MappingSpec("x", "y z")))
    assert path.read_bytes() == before


# --- cmm map --------------------------------------------------------------------------------------


def run(argv: list[str], home: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, environ={"HOME": str(home)}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_add_list_remove(tmp_path: Path) -> None:
    path = tmp_path / ".cmm" / "mappings.toml"
    code, out, err = run(["map", "list"], tmp_path)
    assert (code, err) == (0, "")
    assert "No mappings" in out and not path.parent.exists()  # listing creates nothing

    code, out, err = run(["map", "add", "claude-haiku-4-5", "gemini-2.5-flash"], tmp_path)
    assert code == 0, err
    assert out.splitlines()[0].startswith("Added claude-haiku-4-5 → gemini-2.5-flash via (PROXY_URL)")
    assert f"sudo kill -HUP $(cat {tmp_path}/.cmm/cmm.pid)" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    argv = ["map", "add", "claude-sonnet-4", "gpt-5", "--url", "https://other.example/v1/messages"]
    code, out, err = run([*argv, "--api-key", "sk-secret-1234"], tmp_path)
    assert code == 0, err
    assert "sk-secret" not in out and "****1234" in out

    code, out, err = run(["map", "list"], tmp_path)
    assert code == 0, err
    assert out.splitlines() == [
        "#1 claude-haiku-4-5 → gemini-2.5-flash  (PROXY_URL)                        key (PROXY_API_KEY)",
        "#2 claude-sonnet-4  → gpt-5             https://other.example/v1/messages  key ****1234",
    ]
    assert "sk-secret" not in out

    code, out, err = run(["map", "add", "claude-haiku-4-5", "gpt-5-mini", "--api-key", ""], tmp_path)
    assert code == 0, err
    assert out.startswith("Replaced claude-haiku-4-5 → gpt-5-mini") and "key (no key)" in out

    code, out, err = run(["map", "remove", "claude-sonnet-4", "--config-dir", str(tmp_path / ".cmm")], tmp_path)
    assert code == 0, err
    assert out.startswith("Removed the mapping for claude-sonnet-4")
    assert load(path) == (MappingSpec("claude-haiku-4-5", "gpt-5-mini", api_key=""),)


def test_cli_config_dir_option(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    assert run(["map", "add", "a", "b", "--config-dir", str(other)], tmp_path)[0] == 0
    assert load(other / "mappings.toml") == (MappingSpec("a", "b"),)
    assert not (tmp_path / ".cmm").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["map", "add", "claude haiku", "x"], "cmm: source must be a non-empty name"),
        (["map", "add", "a", "b", "--url", "localhost:8317"], "cmm: url is not usable"),
        (["map", "remove", "absent"], "cmm: no mapping with source 'absent' (sources: 'kept')"),
    ],
)
def test_cli_invalid_input_exits_2_and_changes_nothing(tmp_path: Path, argv: list[str], expected: str) -> None:
    assert run(["map", "add", "kept", "model"], tmp_path)[0] == 0
    path = tmp_path / ".cmm" / "mappings.toml"
    before = path.read_bytes()
    code, out, err = run(argv, tmp_path)
    assert (code, out) == (2, "")
    assert err.startswith(expected)
    assert path.read_bytes() == before


def test_cli_broken_file_is_reported_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / ".cmm" / "mappings.toml"
    path.parent.mkdir()
    path.write_text('[[mapping]]\nsource = "a"\ntaget = "b"\n')
    for argv in (["map", "list"], ["map", "add", "c", "d"], ["map", "remove", "a"]):
        code, out, err = run(argv, tmp_path)
        assert code == 2 and out == ""
        lines = err.splitlines()
        assert all(line.startswith("cmm: ") for line in lines)
        assert "unknown key 'taget' (did you mean 'target'?)" in lines[0]
        assert lines[-1] == f"cmm: fix {path} by hand; it was left unchanged"
    assert path.read_text() == '[[mapping]]\nsource = "a"\ntaget = "b"\n'


def test_cli_map_needs_an_action(tmp_path: Path) -> None:
    code, out, err = run(["map"], tmp_path)
    assert code == 2 and "required: ACTION" in err


def test_map_list_and_add_show_the_env_pair(tmp_path: Path) -> None:
    """The .env pair applies next to the file: list says so, and add says when it replaces it."""
    folder = tmp_path / ".cmm"
    folder.mkdir(mode=0o700)
    (folder / ".env").write_text("DEFAULT_SOURCE_MODEL=claude-haiku-4-5\nDEFAULT_TARGET_MODEL=gemini-2.5-flash\n")
    code, out, err = run(["map", "add", "claude-sonnet-4", "gpt-5"], tmp_path)
    assert code == 0 and "replaces" not in out, err
    code, out, _ = run(["map", "list"], tmp_path)
    assert out.splitlines()[-1] == ("and from .env (DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL): "
                                    "claude-haiku-4-5 → gemini-2.5-flash")
    code, out, _ = run(["map", "add", "claude-haiku-4-5", "o3"], tmp_path)
    assert code == 0 and "it replaces the .env pair claude-haiku-4-5 → gemini-2.5-flash" in out
    code, out, _ = run(["map", "list"], tmp_path)
    assert "from .env" not in out
