"""What `cmm setup`, `cmm uninstall` and `cmm status` do about trust: the preflight, the reports
and the status query, on a fake machine with temporary paths only."""

from __future__ import annotations

from pathlib import Path

import attrs

from cmm.machine import certs, profiles, trust, trust_stores

from machine_fakes import NOW, FakeTools, make_machine, write_ca


def test_setup_trust_reports_a_refused_ca(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    store = trust_stores.detect_system_store(machine)
    old = tmp_path / "cfg" / "ca.crt"
    old.parent.mkdir()
    old.write_bytes(certs.make_ca(NOW, excluded_networks=()).cert_pem)
    report = trust.setup_trust(old, machine, profile=False, store=store, system_requested=True)
    assert report.failed and "cmm setup --force" in report.warnings[0]
    assert tools.calls == []


def test_preflight(tmp_path: Path) -> None:
    tools = FakeTools()
    user = make_machine(tmp_path, tools, have=["update-ca-certificates"], is_root=False)
    root = attrs.evolve(user, is_root=True)
    ca = write_ca(tmp_path / "cfg")
    none = make_machine(tmp_path, tools)

    assert trust.system_preflight(ca, none, requested=True, force=False) == (None, trust_stores.NO_STORE_MESSAGE)
    assert "needs root" in str(trust.system_preflight(ca, user, requested=True, force=False)[1])
    store, problem = trust.system_preflight(ca, root, requested=True, force=False)
    assert store is not None and problem is None
    # nothing in the store: --force concerns only the files
    assert trust.system_preflight(ca, user, requested=False, force=True) == (None, None)
    trust_stores.install_system_trust(store, ca, root)
    problem = trust.system_preflight(ca, user, requested=False, force=True)[1]
    assert problem and "sudo cmm setup --force" in problem
    assert trust.system_preflight(ca, root, requested=False, force=True) == (store, None)
    # the store holds another folder's CA: not ours to replace
    other = write_ca(tmp_path / "other")
    assert trust.system_preflight(other, root, requested=False, force=True) == (None, None)


# --- status ------------------------------------------------------------------------------------


def test_trust_status(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"], environment_value="/elsewhere.pem")
    config = machine.home / ".cmm"

    status = trust.trust_status(config, machine=machine)
    assert not status.ca_exists and not status.ok and status.fix == "cmm setup"
    assert "no CA yet" in status.detail

    ca = write_ca(config)
    (machine.home / ".bashrc").write_text("")
    (machine.home / ".zshrc").write_text("export NODE_EXTRA_CA_CERTS=/corp.pem\n")
    status = trust.trust_status(config, machine=machine)
    assert status.ca_exists and not status.profile_ok and not status.ok
    assert "~/.zshrc sets it to /corp.pem" in status.detail
    assert "single file" in status.fix

    profiles.install_profiles(ca, machine)
    store = trust_stores.detect_system_store(machine)
    assert store is not None
    trust_stores.install_system_trust(store, ca, machine)
    status = trust.trust_status(config, machine=machine)
    assert status.ok and status.fix == ""
    assert [p.path.name for p in status.profiles if p.points_at_ca] == [".bashrc"]
    assert status.system == trust_stores.SystemTrustStatus(store, True, True)
    assert "~/.bashrc" in status.detail and "system trust store holds cmm's CA" in status.detail
    assert status.environment_value == "/elsewhere.pem" and not status.environment_ok
    assert trust.trust_status(config, machine=attrs.evolve(machine, environment_value=str(ca))).environment_ok

    write_ca(config)  # a new CA; the store still has the old one
    status = trust.trust_status(config, machine=machine)
    assert status.system.current is False and "older cmm CA" in status.detail
    assert trust.trust_status(config, machine=machine, system=False).system.store is None


# --- setup and uninstall reports ---------------------------------------------------------------


def test_setup_and_uninstall_trust_reports(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    ca = write_ca(machine.home / ".cmm")
    (machine.home / ".bashrc").write_text("")
    (machine.home / ".zshrc").write_text("export NODE_EXTRA_CA_CERTS=/corp.pem\n")
    store = trust_stores.detect_system_store(machine)

    report = trust.setup_trust(ca, machine, profile=True, store=store, system_requested=True)
    assert not report.failed
    assert report.lines == (
        "shell profile ~/.bashrc: added the NODE_EXTRA_CA_CERTS line",
        f"system trust store: added cmm's CA to {store.describe()}",  # type: ignore[union-attr]
    )
    assert len(report.warnings) == 1 and "~/.zshrc" in report.warnings[0]

    (machine.home / ".profile").write_text(f'export NODE_EXTRA_CA_CERTS="{ca}"\n')  # by hand
    report = trust.uninstall_trust(ca, machine)
    assert not report.failed
    assert report.lines == (
        f"System trust store: removed cmm's CA from {store.describe()}.",  # type: ignore[union-attr]
        "Shell profile ~/.bashrc: removed the NODE_EXTRA_CA_CERTS line.",
    )
    assert report.warnings == (
        f"~/.profile still sets NODE_EXTRA_CA_CERTS to {ca} on a line cmm did not write; delete it yourself",
    )


def test_uninstall_trust_stops_when_the_store_needs_root(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    ca = write_ca(machine.home / ".cmm")
    store = trust_stores.detect_system_store(machine)
    assert store is not None
    trust_stores.install_system_trust(store, ca, machine)
    profiles.install_profiles(ca, machine)
    created = machine.home / ".bashrc"
    before = created.read_text()

    report = trust.uninstall_trust(ca, attrs.evolve(machine, is_root=False))
    assert report.failed and "sudo cmm uninstall" in report.warnings[0]
    assert created.read_text() == before  # nothing half removed
    assert store.location is not None and store.location.exists()
