"""Fake machines for the trust tests: a temporary home and root, and store tools (p11-kit's
trust, macOS's security) that keep a little state, so nothing touches the real machine."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote_from_bytes

import attrs
import pytest
from cryptography import x509

from cmm.machine import certs
from cmm.machine.commands import CommandResult, Machine
from cmm.machine.profile_lines import MARKER


NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CA = Path("/home/me/.cmm/ca.crt")
POSIX_LINE = f'export NODE_EXTRA_CA_CERTS="{CA}" {MARKER}'
FISH_LINE = f'set -gx NODE_EXTRA_CA_CERTS "{CA}" {MARKER}'


# --- fakes -------------------------------------------------------------------------------------


@attrs.define
class FakeTools:
    """Commands the tests allow, recording every call; p11-kit's trust and macOS's security keep
    a little state so that status, store and remove agree."""

    calls: list[list[str]] = attrs.field(factory=list)
    fail: set[str] = attrs.field(factory=set)
    anchors: dict[str, str] = attrs.field(factory=dict)  # p11-kit: uri -> label
    keychain: dict[str, str] = attrs.field(factory=dict)  # macOS: SHA-1 -> common name
    stored: list[tuple[str, bytes]] = attrs.field(factory=list)  # (path, bytes) each tool read
    before_read: Callable[[], None] = lambda: None  # what someone else does just before the tool reads

    def read(self, path: str) -> bytes:
        self.before_read()
        data = Path(path).read_bytes()
        self.stored.append((path, data))
        return data

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        tool = Path(argv[0]).name
        if tool in self.fail:
            return CommandResult(1, "", f"{tool}: it broke")
        if tool == "trust":
            return self._trust(argv[1:])
        if tool == "security":
            return self._security(argv[1:])
        return CommandResult(0, "Updating certificates... done.\n")

    def _trust(self, args: list[str]) -> CommandResult:
        if args[:1] == ["list"]:
            listing = "".join(
                f"{uri}\n    type: certificate\n    label: {label}\n    trust: anchor\n    category: authority\n\n"
                for uri, label in self.anchors.items()
            )
            return CommandResult(0, listing)
        if args[:2] == ["anchor", "--store"]:
            cert = x509.load_pem_x509_certificate(self.read(args[2]))
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            label = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            self.anchors[f"pkcs11:id={quote_from_bytes(ski, safe='')};type=cert"] = str(label)
            return CommandResult(0)
        if args[:2] == ["anchor", "--remove"]:
            return CommandResult(0) if self.anchors.pop(args[2], None) else CommandResult(1, "", "not found")
        return CommandResult(2, "", "usage")

    def _security(self, args: list[str]) -> CommandResult:
        if args[0] == "find-certificate":
            name = args[args.index("-c") + 1]
            found = [digest for digest, cn in self.keychain.items() if name in cn]
            if not found:
                return CommandResult(44, "", "The specified item could not be found in the keychain.")
            listing = "".join(f'SHA-256 hash: {"0" * 64}\nSHA-1 hash: {d}\nkeychain: "x"\n' for d in found)
            return CommandResult(0, listing)
        if args[0] == "add-trusted-cert":
            der = certs.pem_certificates(self.read(args[-1]))[0]
            cert = x509.load_der_x509_certificate(der)
            self.keychain[hashlib.sha1(der).hexdigest().upper()] = str(
                cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            )
            return CommandResult(0)
        if args[0] == "remove-trusted-cert":
            self.read(args[-1])
            return CommandResult(0)
        if args[0] == "delete-certificate":
            self.keychain.pop(args[args.index("-Z") + 1])
            return CommandResult(0)
        return CommandResult(0)

    def commands(self) -> list[str]:
        return [" ".join([Path(argv[0]).name, *argv[1:]]) for argv in self.calls]


def make_machine(
    tmp_path: Path,
    tools: FakeTools | None = None,
    *,
    have: Sequence[str] = (),
    is_root: bool = True,
    platform: str = "linux",
    shell: str = "/bin/bash",
    environment_value: str | None = None,
) -> Machine:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (tmp_path / "root").mkdir(exist_ok=True)
    available = set(have)
    return Machine(
        home=home,
        shell=shell,
        is_root=is_root,
        root=tmp_path / "root",
        platform=platform,
        environment_value=environment_value,
        which=lambda name: f"/usr/sbin/{name}" if name in available else None,
        run=tools if tools is not None else FakeTools(),
    )


def write_ca(directory: Path, common_name: str = "cmm local CA") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.crt"
    path.write_bytes(certs.make_ca(NOW, common_name=common_name).cert_pem)
    return path


USER = 65534  # nobody: the user who ran sudo, in the tests that act as another user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def users_file(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, USER, USER)
    return path


def roots_file(path: Path) -> Path:
    """A root file the user can read but not write, as /etc/sudoers.d/x or /etc/profile would be."""
    path.write_text("root's own\n")
    path.chmod(0o644)
    return path
