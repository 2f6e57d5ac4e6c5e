"""Root in the user's config dir: checks, I/O as the owner, and the symlink attacks themselves.

The attacks: a user who can write ``~/.cmm`` plants links there (or a FIFO, or a foreign pid) and
waits for ``sudo twistd cmm`` or ``sudo cmm ...`` to write, read, chmod or signal through them.
Each victim is a root-owned file outside the directory; it must come out untouched.  The tests
that switch ids need root (CI is root) and use uid/gid 65534 (nobody) as the user.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage

from cmm.cli import main as cli, processes, status

from cmm.config import paths, removal

from cmm.testing.checkout import REPO, twistd_command
from cmm.core.records import RequestRecord
from cmm.serve.request_log import RequestLog
from cmm.serve.resolve import AddressBook, Answer
from cmm.daemon.service import InterceptorService
from cmm.daemon.tap import Options
from cmm.machine.usercerts import ensure_certificates
from cmm.config.userfiles import Identity, UnsafeDirectory, UserDir, directory_problem, read_file, running_as
from support import process_env

USER = 65534
GROUP = 65534
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="acting as another user needs root")


def owned(path: Path, uid: int = USER, gid: int = GROUP, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def victim(tmp_path: Path, name: str = "victim") -> Path:
    """A root-only file outside the config dir, as /etc/shadow would be."""
    path = tmp_path / name
    path.write_text("root's own\n")
    path.chmod(0o600)
    return path


def untouched(path: Path) -> bool:
    info = path.stat()
    return path.read_text() == "root's own\n" and (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)


def main(argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, environ=environ, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --- the directory check (pure) ------------------------------------------------------------------


def test_directory_problems_say_the_fix(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    assert directory_problem(os.lstat(good), good, frozenset({os.geteuid()}), "me") is None
    link = tmp_path / "link"
    link.symlink_to(good)
    assert f"rm {link} && mv {good} {link}" in directory_problem(os.lstat(link), link, None, "me")
    os.chmod(good, 0o770)
    assert f"chmod 700 {good}" in directory_problem(os.lstat(good), good, None, "me")
    os.chmod(good, 0o757)
    assert "everyone" in directory_problem(os.lstat(good), good, None, "me")
    os.chmod(good, 0o755)  # readable by others is no way in
    assert directory_problem(os.lstat(good), good, None, "me") is None
    message = directory_problem(os.lstat(good), good, frozenset({4321}), "alice")
    assert f"sudo chown -R alice {good}" in message
    plain = tmp_path / "plain"
    plain.write_text("")
    assert "not a directory" in directory_problem(os.lstat(plain), plain, None, "me")


def test_open_refuses_unsafe_directories(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeDirectory, match="symbolic link"):
        UserDir.open(link)
    os.chmod(real, 0o775)
    with pytest.raises(UnsafeDirectory, match="chmod 700"):
        UserDir.open(real)


def test_missing_directory_is_made_0700_or_left_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        UserDir.open(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    folder = UserDir.open(tmp_path / "made" / ".cmm")
    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700


# --- file operations -----------------------------------------------------------------------------


def test_write_is_atomic_0600_and_replaces_a_link_instead_of_following_it(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "cmm.pid").symlink_to(target)
    folder.write_bytes("cmm.pid", b"42\n")
    assert untouched(target)
    assert not (folder.path / "cmm.pid").is_symlink() and folder.read_bytes("cmm.pid") == b"42\n"
    assert stat.S_IMODE((folder.path / "cmm.pid").stat().st_mode) == 0o600
    assert sorted(p.name for p in folder.path.iterdir()) == ["cmm.pid"]  # no temporary left
    assert removal.is_own_file(".env.0123456789ab.tmp")  # what an interrupted write leaves, uninstall removes


def test_reads_refuse_links_and_fifos(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / ".env").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        folder.read_bytes(".env")
    with pytest.raises(OSError, match="symbolic link"):
        read_file(folder.path / ".env")
    os.mkfifo(folder.path / "cmm.state.json")  # would block a plain open() for ever
    with pytest.raises(OSError, match="not a regular file"):
        folder.read_bytes("cmm.state.json")
    with pytest.raises(OSError, match="not a regular file"):
        read_file(folder.path / "cmm.state.json")
    with pytest.raises(FileNotFoundError):
        folder.read_bytes("nothing")


def test_unlink_removes_the_link_not_its_target(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "cmm.sock").symlink_to(target)
    assert folder.unlink("cmm.sock") and not folder.unlink("cmm.sock")
    assert untouched(target)


def test_acting_refuses_a_directory_swapped_for_a_link_after_the_check(tmp_path: Path) -> None:
    folder = UserDir.open(tmp_path / "cfg")
    folder.path.rename(tmp_path / "moved")
    (tmp_path / "cfg").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(OSError, match="symbolic link"):
        folder.write_bytes("cmm.pid", b"1\n")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_working_directory_is_restored(tmp_path: Path) -> None:
    before = os.getcwd()
    folder = UserDir.open(tmp_path / "cfg")
    with folder.acting():
        assert Path(os.getcwd()) == folder.path
    assert os.getcwd() == before


# --- as the owner (root only) --------------------------------------------------------------------


@needs_root
def test_root_acts_as_the_owner_and_gets_its_ids_back(tmp_path: Path) -> None:
    folder = UserDir.open(owned(tmp_path / "cfg"))
    assert (folder.owner.uid, folder.owner.gid) == (USER, GROUP)
    groups = os.getgroups()
    with folder.acting():
        assert (os.geteuid(), os.getegid()) == (USER, GROUP)
        assert os.getuid() == 0  # only the effective ids change, so root can come back
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)
    folder.write_bytes("cmm.state.json", b"{}")
    info = (folder.path / "cmm.state.json").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (USER, GROUP, 0o600)


@needs_root
def test_ids_come_back_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with running_as(Identity(USER, GROUP, (GROUP,))):
            raise RuntimeError("boom")
    assert (os.geteuid(), os.getegid()) == (0, 0)


@needs_root
def test_a_link_to_a_root_file_gets_the_users_rights_only(tmp_path: Path) -> None:
    """The first line of defence is O_NOFOLLOW; the second, that the open runs as the user."""
    target = victim(tmp_path)
    folder = UserDir.open(owned(tmp_path / "cfg"))
    with folder.acting():
        with pytest.raises(PermissionError):
            open(target, "a")  # what a link-following write by path would reach
    assert untouched(target)


@needs_root
def test_sudo_user_owns_a_new_dir_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    environ = {"SUDO_UID": str(USER), "SUDO_GID": str(GROUP)}
    folder = paths.user_dir(tmp_path / "new" / ".cmm", environ)
    info = folder.path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (USER, GROUP, 0o700)
    with pytest.raises(UnsafeDirectory, match=f"sudo chown -R .* {tmp_path / 'new' / '.cmm'}"):
        paths.user_dir(folder.path, {"SUDO_UID": "4321", "SUDO_GID": "4321"})
    root_owned = paths.user_dir(tmp_path, environ)  # root's own folder: root does the I/O
    assert root_owned.owner.uid == 0


@needs_root
def test_root_without_sudo_acts_as_the_dirs_owner(tmp_path: Path) -> None:
    folder = paths.user_dir(owned(tmp_path / "cfg"), {})
    assert folder.owner.uid == USER


# --- the request log -----------------------------------------------------------------------------


RECORD = RequestRecord(started=0.0, method="POST", path="/v1/messages", model="m", intercepted=False,
                       target=None, status=200, duration=0.01, bytes_in=1, bytes_out=2)


def test_log_is_0600_and_rotates(tmp_path: Path) -> None:
    log = RequestLog.to_file(tmp_path / "cfg" / "cmm.log", max_bytes=200, backups=2, console=None)
    for _ in range(12):
        log(RECORD)
    log.close()
    names = sorted(p.name for p in (tmp_path / "cfg").iterdir())
    assert names == ["cmm.log", "cmm.log.1", "cmm.log.2"]
    assert all(stat.S_IMODE((tmp_path / "cfg" / n).stat().st_mode) == 0o600 for n in names)


def test_log_tightens_an_old_world_readable_file(tmp_path: Path) -> None:
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "cmm.log").write_text("old\n")
    os.chmod(folder.path / "cmm.log", 0o644)
    RequestLog.to_file(folder.path / "cmm.log", console=None, directory=folder).close()
    assert stat.S_IMODE((folder.path / "cmm.log").stat().st_mode) == 0o600


def test_log_link_is_refused_and_its_target_never_made(tmp_path: Path) -> None:
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "cmm.log").symlink_to(tmp_path / "profile.d-x.sh")
    with pytest.raises(OSError, match="symbolic link"):
        RequestLog.to_file(folder.path / "cmm.log", console=None, directory=folder)
    assert not (tmp_path / "profile.d-x.sh").exists()


@needs_root
def test_log_rotation_runs_as_the_owner_and_skips_a_planted_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(owned(tmp_path / "cfg"))
    log = RequestLog.to_file(folder.path / "cmm.log", max_bytes=200, backups=3, console=None, directory=folder)
    (folder.path / "cmm.log.1").symlink_to(target)  # renamed to .2 as a link, never opened
    for _ in range(12):
        log(RECORD)
    log.close()
    assert untouched(target)
    info = (folder.path / "cmm.log").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (USER, 0o600)


# --- certificates ----------------------------------------------------------------------------------


@needs_root
def test_certificates_are_made_as_the_owner(tmp_path: Path) -> None:
    folder = UserDir.open(owned(tmp_path / "cfg"))
    result = ensure_certificates(folder)
    assert result.created_ca and result.paths.ca_cert == folder.path / "ca.crt"
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        info = (folder.path / name).stat()
        assert (info.st_uid, info.st_gid) == (USER, GROUP)
    assert stat.S_IMODE((folder.path / "ca.key").stat().st_mode) == 0o600
    again = ensure_certificates(folder)
    assert not (again.created_ca or again.issued_server)


def test_a_linked_certificate_file_stops_the_certificates_and_its_target_is_untouched(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "ca.key").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        ensure_certificates(folder)
    assert untouched(target) and (folder.path / "ca.key").is_symlink()


# --- the address cache -----------------------------------------------------------------------------


def test_address_cache_is_written_in_place_of_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    (folder.path / "anthropic-ip.cache").symlink_to(target)
    service = InterceptorService(config=None, reactor=object(), user_dir=folder)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="symbolic link"):
        service._load_address_cache()
    service._save_address_cache("160.79.104.10 0\n")
    assert untouched(target)
    assert service._load_address_cache() == "160.79.104.10 0\n"
    assert stat.S_IMODE((folder.path / "anthropic-ip.cache").stat().st_mode) == 0o600


# --- twistd cmm options: refused config dirs -------------------------------------------------------


def parse(args: list[str], environ: dict[str, str]) -> Options:
    options = Options(environ=environ)
    options.parseOptions(args)
    return options


def test_twistd_refuses_a_linked_config_dir(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "cfg").symlink_to(tmp_path / "real")
    with pytest.raises(usage.UsageError, match="is a symbolic link"):
        parse(["--config-dir", str(tmp_path / "cfg"), "--source", "a", "--target", "b"], {})


def test_twistd_refuses_a_group_writable_config_dir(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    os.chmod(tmp_path / "cfg", 0o770)
    with pytest.raises(usage.UsageError, match=f"chmod 700 {tmp_path / 'cfg'}"):
        parse(["--config-dir", str(tmp_path / "cfg"), "--source", "a", "--target", "b"], {})


@needs_root
def test_twistd_under_sudo_refuses_another_users_config_dir(tmp_path: Path) -> None:
    owned(tmp_path / "cfg")
    with pytest.raises(usage.UsageError, match="sudo chown -R"):
        parse(["--config-dir", str(tmp_path / "cfg"), "--source", "a", "--target", "b"],
              {"SUDO_UID": "4321", "SUDO_GID": "4321"})


def test_twistd_refuses_a_linked_env_file(tmp_path: Path) -> None:
    target = victim(tmp_path)
    (tmp_path / "cfg").mkdir(mode=0o700)
    (tmp_path / "cfg" / ".env").symlink_to(target)
    with pytest.raises(usage.UsageError, match="symbolic link"):
        parse(["--config-dir", str(tmp_path / "cfg"), "--source", "a", "--target", "b"], {})
    assert untouched(target)


# --- cmm commands ------------------------------------------------------------------------------------


def test_cmm_config_refuses_an_unsafe_dir_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    os.chmod(tmp_path / "cfg", 0o777)
    code, _, err = main(["config", "set", "DEFAULT_TARGET_MODEL", "m", "--config-dir", str(tmp_path / "cfg")], {})
    assert code == 1 and f"chmod 700 {tmp_path / 'cfg'}" in err
    assert list((tmp_path / "cfg").iterdir()) == []


@needs_root
def test_sudo_cmm_config_and_map_write_as_the_user_past_planted_links(tmp_path: Path) -> None:
    env_victim, map_victim = victim(tmp_path, "env-victim"), victim(tmp_path, "map-victim")
    config = owned(tmp_path / "cfg")
    (config / ".env").symlink_to(env_victim)
    (config / "mappings.toml").symlink_to(map_victim)
    environ = {"SUDO_UID": str(USER), "SUDO_GID": str(GROUP)}
    code, _, err = main(["config", "set", "DEFAULT_TARGET_MODEL", "m", "--config-dir", str(config)], environ)
    assert code == 1 and "symbolic link" in err  # the existing text cannot be read: nothing written
    (config / ".env").unlink()
    code, _, err = main(["config", "set", "DEFAULT_TARGET_MODEL", "m", "--config-dir", str(config)], environ)
    assert code == 0, err
    info = (config / ".env").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (USER, 0o600)
    code, _, err = main(["map", "add", "claude-haiku", "g", "--config-dir", str(config)], environ)
    assert code == 1 and "symbolic link" in err
    assert untouched(env_victim) and untouched(map_victim)


@needs_root
def test_uninstall_removes_links_themselves_as_the_user(tmp_path: Path) -> None:
    target = victim(tmp_path)
    config = owned(tmp_path / "cfg")
    (config / "ca.crt").symlink_to(target)
    (config / "cmm.log").write_text("x")
    result = removal.remove_config_dir(UserDir.open(config))
    assert result.folder_removed and untouched(target)


# --- cmm stop and cmm status: only cmm is signalled ---------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/python3", "/usr/local/bin/twistd", "-n", "cmm", "--source", "a"], True),
    (["/usr/local/bin/twistd", "--pidfile", "/run/cmm.pid", "cmm"], True),
    ([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "cmm"], True),
    (["sleep", "60"], False),
    (["/usr/local/bin/twistd", "-n", "web"], False),
    (["python3", "cmm"], False),
    (["bash", "-c", "echo cmm"], False),
    ([], False),
])
def test_is_cmm_command(argv: list[str], expected: bool) -> None:
    assert processes.is_cmm_command(argv) is expected


def test_is_cmm_process_on_real_processes() -> None:
    assert processes.is_cmm_command(twistd_command(["--port", "1"]))  # the form tests and the benchmark run
    assert not processes.is_cmm_process(os.getpid())  # pytest
    child = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while processes.command_line(child.pid) != ["sleep", "60"]:  # until the child has exec'd
            assert time.monotonic() < deadline, processes.command_line(child.pid)
            time.sleep(0.01)
        assert not processes.is_cmm_process(child.pid)
    finally:
        child.kill()
        child.wait()


def test_stop_leaves_an_unrelated_process_alone(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n")
    child = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "cmm.pid").write_text(f"{child.pid}\n")
        code, out, err = main(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)], {})
        assert code == 0, err
        assert f"pid {child.pid} from {tmp_path / 'cmm.pid'} is not cmm" in out
        time.sleep(0.2)
        assert child.poll() is None  # still running
        assert not (tmp_path / "cmm.pid").exists()  # the stale file is gone
    finally:
        child.kill()
        child.wait()


def test_stop_reads_no_pid_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    (tmp_path / "cfg").mkdir(mode=0o700)
    (tmp_path / "cfg" / "cmm.pid").symlink_to(target)
    result = cli.stop_process(tmp_path / "cfg" / "cmm.pid", is_alive=lambda pid: True, is_cmm=lambda pid: True,
                              kill=lambda pid, sig: pytest.fail("signalled"))
    assert result.state is cli.StopState.INVALID_PID_FILE and untouched(target)


def test_status_does_not_count_an_unrelated_process(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "cmm.pid").write_text(f"{child.pid}\n")
        found = status.find_instance(tmp_path)
        assert not found.running and "another process" in found.note
    finally:
        child.kill()
        child.wait()


# --- the real service as root, against a config dir full of planted links -----------------------------


def _run_cmm(config: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--config-dir", str(config), "--no-hosts",
                           "--workers", "0", "--anthropic-ip", "127.0.0.1", "--source", "a", "--target", "b", *extra])
    return subprocess.Popen(argv, stdout=out.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env=process_env(SUDO_UID=str(USER), SUDO_GID=str(GROUP), SUDO_USER=None))


def _wait_for(out: Path, pattern: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, out.read_text(errors="replace")):
        assert process.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
        time.sleep(0.05)


@needs_root
def test_sudo_twistd_writes_past_planted_links_as_the_user_and_stops_cleanly(tmp_path: Path) -> None:
    config = owned(tmp_path / "cfg")
    victims = {name: victim(tmp_path, f"victim-{name}") for name in ("cmm.pid", "cmm.state.json", "cmm.sock")}
    for name, target in victims.items():
        (config / name).symlink_to(target)
    out = tmp_path / "cmm.out"
    process = _run_cmm(config, out)
    try:
        _wait_for(out, r"cmm serving on port", process)
        assert all(untouched(target) for target in victims.values())
        for name in ("cmm.pid", "cmm.state.json", "cmm.log", "ca.key", "server.key"):
            info = (config / name).lstat()
            assert stat.S_ISREG(info.st_mode) and (info.st_uid, info.st_gid) == (USER, GROUP), name
            assert stat.S_IMODE(info.st_mode) == 0o600, name
        sock = (config / "cmm.sock").lstat()
        assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == USER and stat.S_IMODE(sock.st_mode) == 0o600
        assert json.loads((config / "cmm.state.json").read_text())["pid"] == process.pid
        code, out_text, err = main(["stop", "--config-dir", str(config), "--hosts-file", str(tmp_path / "hosts")], {})
        assert code == 0 and f"Stopped cmm (pid {process.pid})" in out_text, err
        assert process.wait(10) in (0, -15)  # twistd exits through the signal it stopped on
        assert sorted(p.name for p in config.iterdir()) == ["ca.crt", "ca.key", "cmm.log", "server.crt",
                                                              "server.key"]
    finally:
        process.kill()
        process.wait()
    assert all(untouched(target) for target in victims.values())


@needs_root
def test_sudo_twistd_refuses_a_linked_log_and_creates_nothing_through_it(tmp_path: Path) -> None:
    config = owned(tmp_path / "cfg")
    planted = tmp_path / "sudoers.d-x"  # does not exist: following the link would create it as root
    (config / "cmm.log").symlink_to(planted)
    out = tmp_path / "cmm.out"
    process = _run_cmm(config, out)
    try:
        assert process.wait(30) != 0
    finally:
        process.kill()
        process.wait()
    assert "cmm.log" in out.read_text() and "symbolic link" in out.read_text()
    assert not planted.exists()


def test_a_hard_link_is_not_opened_for_the_log(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = UserDir.open(tmp_path / "cfg")
    os.link(target, folder.path / "cmm.log")  # root may link anything; a user only their own files
    with pytest.raises(OSError, match="hard links"):
        RequestLog.to_file(folder.path / "cmm.log", console=None, directory=folder)
    assert untouched(target)


def test_stop_with_a_pid_file_in_a_linked_system_folder(tmp_path: Path) -> None:
    """`--pid-file /var/run/cmm.pid`, /var/run being a link to /run: the folder is resolved."""
    (tmp_path / "run").mkdir(mode=0o755)
    (tmp_path / "var-run").symlink_to(tmp_path / "run")
    (tmp_path / "run" / "cmm.pid").write_text("0\n")
    code, out, err = main(["stop", "--pid-file", str(tmp_path / "var-run" / "cmm.pid"),
                           "--hosts-file", str(tmp_path / "hosts")], {})
    assert code == 1 and f"{tmp_path / 'run' / 'cmm.pid'} names pid 0, which is never cmm" in err, err


def test_status_reads_no_certificate_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    (tmp_path / "cfg").mkdir(mode=0o700)
    (tmp_path / "cfg" / "server.crt").symlink_to(target)
    info = status.read_certificate(tmp_path / "cfg")
    assert info.not_after is None and "symbolic link" in info.problem


def test_only_plain_names_inside_the_directory(tmp_path: Path) -> None:
    folder = UserDir.open(tmp_path / "cfg")
    for name in ("../escape", "a/b", "..", ""):
        with pytest.raises(ValueError, match="not a file name"):
            folder.write_bytes(name, b"x")
    assert not (tmp_path / "escape").exists()


def test_address_book_uses_the_injected_cache_callables() -> None:
    saved: list[str] = []
    answers: list[defer.Deferred[Answer]] = []

    def resolve() -> defer.Deferred[Answer]:
        answers.append(defer.Deferred())
        return answers[-1]

    book = AddressBook(resolve=resolve, clock=Clock(), load_cache=lambda: "# cached\n192.0.2.7\n",
                       save_cache=saved.append)
    waiting = book.current()
    answers[0].errback(LookupError("DNS down"))
    assert waiting.result == ["192.0.2.7"]  # from load_cache, no file involved
    book.expires = 0
    book.current()
    answers[1].callback(Answer(("192.0.2.1",), 300))
    assert len(saved) == 1 and saved[0].endswith("192.0.2.1\n")
