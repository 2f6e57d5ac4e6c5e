"""Which DNS caches get flushed, detected from the system (all injected)."""

from __future__ import annotations

import subprocess

from cmm.machine.dnsflush import flush, flush_commands


def test_macos_flushes_mdnsresponder() -> None:
    assert flush_commands("darwin", which=lambda name: None, exists=lambda path: False) == [
        ["dscacheutil", "-flushcache"], ["killall", "-HUP", "mDNSResponder"]]


def test_linux_flushes_only_the_caches_that_run() -> None:
    present = {"/run/systemd/resolve", "/run/nscd/socket"}
    everything = flush_commands("linux", which=lambda name: f"/usr/bin/{name}", exists=present.__contains__)
    assert everything == [["resolvectl", "flush-caches"], ["nscd", "--invalidate=hosts"]]
    assert flush_commands("linux", which=lambda name: None, exists=present.__contains__) == []
    assert flush_commands("linux", which=lambda name: "/usr/bin/x", exists=lambda path: False) == []


def test_failures_are_reported_not_raised() -> None:
    ran: list[list[str]] = []

    def run(command: list[str]) -> int:
        ran.append(command)
        if command[0] == "nscd":
            raise subprocess.TimeoutExpired(command, 10)
        return 1 if command[0] == "resolvectl" else 0

    problems = flush([["resolvectl", "flush-caches"], ["nscd", "--invalidate=hosts"], ["true"]], run=run)
    assert ran == [["resolvectl", "flush-caches"], ["nscd", "--invalidate=hosts"], ["true"]]
    assert problems[0] == "resolvectl flush-caches exited with 1"
    assert problems[1].startswith("nscd --invalidate=hosts:") and len(problems) == 2
