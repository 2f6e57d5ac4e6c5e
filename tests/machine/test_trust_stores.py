"""The system trust stores with fake tools under a temporary root: detection, install, replace,
remove, and that root hands a store only cmm's checked CA."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import pytest

from cmm.machine import certs, trust, trust_stores
from cmm.machine.trust_stores import StoreKind, SystemStore, TrustError

from machine_fakes import NOW, USER, FakeTools, make_machine, needs_root, write_ca


@needs_root
def test_ca_is_read_as_the_user_never_through_a_link(tmp_path: Path, user_home: Path) -> None:
    """ca.crt linked to a file only root can read gives root's tools nothing of it."""
    tools = FakeTools()
    machine = attrs.evolve(make_machine(tmp_path, tools, have=["trust"]), home=user_home, owner=(USER, USER))
    secret = tmp_path / "root-only.pem"
    secret.write_bytes(certs.make_ca(NOW).cert_pem)
    secret.chmod(0o600)
    config = user_home / ".cmm"
    config.mkdir()
    os.chown(config, USER, USER)
    (config / "ca.crt").symlink_to(secret)
    assert trust_stores.read_ca(config / "ca.crt", machine) is None
    store = trust_stores.detect_system_store(machine)
    assert store is not None
    with pytest.raises(TrustError):
        trust_stores.install_system_trust(store, config / "ca.crt", machine)
    assert tools.stored == []
    assert trust.system_preflight(config / "ca.crt", machine, requested=False, force=True) == (None, None)


# --- system trust stores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "have", "dirs", "kind"),
    [
        ("darwin", ["security", "trust"], ["Library/Keychains/System.keychain"], StoreKind.MACOS),
        ("darwin", ["security"], [], None),  # no System keychain: not a Mac after all
        ("linux", ["security", "update-ca-certificates", "trust"], [], StoreKind.DEBIAN),
        ("linux", ["update-ca-trust", "trust"], ["etc/pki/ca-trust/source/anchors"], StoreKind.FEDORA),
        ("linux", ["update-ca-trust", "trust"], [], StoreKind.P11KIT),  # Arch: no /etc/pki
        ("linux", ["trust"], [], StoreKind.P11KIT),
        ("linux", [], ["etc/pki/ca-trust/source/anchors"], None),
    ],
)
def test_detection(tmp_path: Path, platform: str, have: list[str], dirs: list[str], kind: StoreKind | None) -> None:
    machine = make_machine(tmp_path, have=have, platform=platform)
    for name in dirs:
        (machine.root / name).mkdir(parents=True)
    store = trust_stores.detect_system_store(machine)
    assert (store.kind if store else None) is kind
    if kind is StoreKind.DEBIAN:
        assert store is not None and store.location == machine.root / "usr/local/share/ca-certificates/cmm-local-ca.crt"


@pytest.mark.parametrize(
    ("have", "dirs", "update"),
    [
        (["update-ca-certificates"], ["usr/local/share/ca-certificates"], ["update-ca-certificates"]),
        (["update-ca-trust"], ["etc/pki/ca-trust/source/anchors"], ["update-ca-trust extract"]),
    ],
)
def test_file_based_store(tmp_path: Path, have: list[str], dirs: list[str], update: list[str]) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=have)
    for name in dirs:
        (machine.root / name).mkdir(parents=True)
    store = trust_stores.detect_system_store(machine)
    assert store is not None and store.location is not None
    ca = write_ca(tmp_path / "cfg")
    assert trust_stores.system_status(store, ca.read_bytes(), machine) == trust_stores.SystemTrustStatus(store, False, False)

    assert "added cmm's CA to" in trust_stores.install_system_trust(store, ca, machine)
    assert store.location.read_bytes() == ca.read_bytes()
    assert stat.S_IMODE(store.location.stat().st_mode) == 0o644
    assert tools.commands() == update
    assert trust_stores.system_status(store, ca.read_bytes(), machine) == trust_stores.SystemTrustStatus(store, True, True)

    assert "already trusts" in trust_stores.install_system_trust(store, ca, machine)
    assert tools.commands() == update  # nothing run again

    new_ca = write_ca(tmp_path / "cfg")  # setup --force
    assert trust_stores.system_status(store, new_ca.read_bytes(), machine).current is False
    assert "replaced the old cmm CA" in trust_stores.install_system_trust(store, new_ca, machine)
    assert store.location.read_bytes() == new_ca.read_bytes()

    assert trust_stores.remove_system_trust(store, machine, new_ca) is not None
    assert not store.location.exists()
    assert tools.commands() == update * 3
    assert trust_stores.remove_system_trust(store, machine, new_ca) is None
    assert tools.commands() == update * 3


def test_p11kit_store(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["trust"])
    store = trust_stores.detect_system_store(machine)
    assert store is not None and store.kind is StoreKind.P11KIT
    tools.anchors["pkcs11:id=%01%02;type=cert"] = "Some Other Root"
    ca = write_ca(tmp_path / "cfg")

    trust_stores.install_system_trust(store, ca, machine)
    assert tools.commands()[-1].startswith("trust anchor --store ")
    assert_private_copy(tools, ca)
    assert trust_stores.system_status(store, ca.read_bytes(), machine) == trust_stores.SystemTrustStatus(store, True, True)

    new_ca = write_ca(tmp_path / "cfg")
    assert trust_stores.system_status(store, new_ca.read_bytes(), machine) == trust_stores.SystemTrustStatus(store, True, False)
    assert "replaced" in trust_stores.install_system_trust(store, new_ca, machine)
    assert len(tools.anchors) == 2  # the old cmm CA went, the other root stayed

    tools.calls.clear()
    assert trust_stores.remove_system_trust(store, machine, new_ca) is not None
    assert [c[:3] for c in tools.calls] == [
        ["/usr/sbin/trust", "list", "--filter=ca-anchors"],
        ["/usr/sbin/trust", "list", "--filter=ca-anchors"],
        ["/usr/sbin/trust", "anchor", "--remove"],
    ]
    assert list(tools.anchors.values()) == ["Some Other Root"]


def assert_private_copy(tools: FakeTools, ca: Path) -> None:
    """The tool read the checked bytes from root's own copy, which is gone afterwards."""
    path, data = tools.stored[-1]
    assert data == ca.read_bytes()
    assert Path(path) != ca and Path(path).parent.parent == Path(trust_stores.PRIVATE_COPY_PARENT)
    assert not Path(path).parent.exists()


def test_macos_keychain(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["security"], platform="darwin")
    keychain = machine.root / "Library/Keychains/System.keychain"
    keychain.parent.mkdir(parents=True)
    keychain.write_bytes(b"")
    store = trust_stores.detect_system_store(machine)
    assert store is not None and store.kind is StoreKind.MACOS
    ca = write_ca(tmp_path / "cfg")

    trust_stores.install_system_trust(store, ca, machine)
    assert tools.commands()[-1].startswith(f"security add-trusted-cert -d -r trustRoot -k {keychain} ")
    assert_private_copy(tools, ca)
    assert trust_stores.system_status(store, ca.read_bytes(), machine).current is True

    new_ca = write_ca(tmp_path / "cfg")
    trust_stores.install_system_trust(store, new_ca, machine)
    assert len(tools.keychain) == 1 and trust_stores.system_status(store, new_ca.read_bytes(), machine).current

    assert trust_stores.remove_system_trust(store, machine, new_ca) is not None
    assert tools.keychain == {}
    removal = next(c for c in tools.calls if c[1] == "remove-trusted-cert")
    assert removal[-1] != str(new_ca)  # root's own copy of the checked certificate, not the user's path
    assert_private_copy(tools, new_ca)
    assert any(c.startswith("security delete-certificate -Z ") for c in tools.commands())


def test_store_needs_root_and_reports_tool_failures(tmp_path: Path) -> None:
    tools = FakeTools(fail={"update-ca-certificates"})
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"], is_root=False)
    store = trust_stores.detect_system_store(machine)
    assert store is not None
    ca = write_ca(tmp_path / "cfg")
    with pytest.raises(TrustError, match="needs root"):
        trust_stores.install_system_trust(store, ca, machine)
    assert tools.calls == [] and not store.location.exists()  # type: ignore[union-attr]
    with pytest.raises(TrustError, match="it broke"):
        trust_stores.install_system_trust(store, ca, attrs.evolve(machine, is_root=True))


STORES = [
    pytest.param(["update-ca-certificates"], "linux", id="debian"),
    pytest.param(["trust"], "linux", id="p11kit"),
    pytest.param(["security"], "darwin", id="macos"),
]


def store_for(tmp_path: Path, tools: FakeTools, have: list[str], platform: str) -> SystemStore:
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    keychain = machine.system_path(trust_stores.MACOS_KEYCHAIN)
    keychain.parent.mkdir(parents=True, exist_ok=True)
    keychain.write_bytes(b"")
    store = trust_stores.detect_system_store(machine)
    assert store is not None
    return store


def refused_cas(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """ca.crt files root must not make system roots, and the reason it gives for each."""
    config = tmp_path / "refused"
    config.mkdir()
    made = {
        "old": (certs.make_ca(NOW, excluded_networks=()).cert_pem, "cmm setup --force"),
        "open": (certs.make_ca(NOW, permitted_names=None).cert_pem, "without cmm's name constraint"),
        "bundle": (certs.make_ca(NOW).cert_pem + certs.make_ca(NOW, permitted_names=None).cert_pem,
                   "exactly one certificate"),
        "junk": (b"-----BEGIN CERTIFICATE-----\nbm90\n-----END CERTIFICATE-----\n", "not a PEM certificate"),
    }
    found = {}
    for name, (pem, reason) in made.items():
        (config / name).mkdir()
        (config / name / "ca.crt").write_bytes(pem)
        found[name] = (config / name / "ca.crt", reason)
    elsewhere = write_ca(tmp_path / "elsewhere")  # a good CA, but reached through a link
    (config / "link").mkdir()
    (config / "link" / "ca.crt").symlink_to(elsewhere)
    found["link"] = (config / "link" / "ca.crt", "symbolic link")
    found["missing"] = (config / "missing" / "ca.crt", "run `cmm setup` first")
    return found


@pytest.mark.parametrize(("have", "platform"), STORES)
def test_system_trust_installs_only_cmms_constrained_ca(tmp_path: Path, have: list[str], platform: str) -> None:
    tools = FakeTools()
    store = store_for(tmp_path, tools, have, platform)
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    for name, (ca, reason) in refused_cas(tmp_path).items():
        with pytest.raises(TrustError, match="not making .* a system root") as refused:
            trust_stores.install_system_trust(store, ca, machine)
        assert reason in str(refused.value), name
    assert tools.calls == [] and tools.stored == []
    assert store.location is None or store.kind is StoreKind.MACOS or not store.location.exists()
    assert tools.keychain == {} and tools.anchors == {}


@pytest.mark.parametrize(("have", "platform"), STORES[1:])
def test_system_trust_tool_gets_the_checked_bytes(tmp_path: Path, have: list[str], platform: str) -> None:
    """Swapping ca.crt between root's check and the tool's read changes nothing."""
    tools = FakeTools()
    store = store_for(tmp_path, tools, have, platform)
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    ca = write_ca(tmp_path / "cfg")
    checked = ca.read_bytes()
    tools.before_read = lambda: ca.write_bytes(certs.make_ca(NOW, permitted_names=None).cert_pem)
    trust_stores.install_system_trust(store, ca, machine)
    assert tools.stored[-1][1] == checked != ca.read_bytes()
