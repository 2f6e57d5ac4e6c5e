"""Making the machine trust cmm's CA, and taking that trust away again: what ``cmm setup``,
``cmm uninstall``, ``cmm status`` and ``cmm doctor`` do and say.

The pieces are the shell profiles (:mod:`cmm.machine.profiles`, the line itself in
:mod:`cmm.machine.profile_lines`) and the optional system store (:mod:`cmm.machine.trust_stores`),
both on an injected :class:`~cmm.machine.commands.Machine`, so tests never touch the real machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from cmm.machine import certs
from cmm.machine.commands import Machine, as_owner, display
from cmm.machine.profile_lines import VARIABLE, Assignment, assignments
from cmm.machine.profiles import (ProfileAction, ProfileChange, existing_profiles, install_profiles, points_at_ca, read_profile,
                                  remove_profiles)
from cmm.machine.trust_stores import (NO_STORE_MESSAGE, SystemStore, SystemTrustStatus, TrustError, detect_system_store,
                                      install_system_trust, read_ca, remove_system_trust, system_status)


@attrs.frozen
class ProfileStatus:
    """One existing profile: the values set there, and whether the one that wins names the CA."""

    path: Path
    assignments: tuple[Assignment, ...]
    points_at_ca: bool

    @property
    def managed(self) -> bool:
        return any(a.managed for a in self.assignments)


@attrs.frozen
class TrustStatus:
    """Whether Claude Code (and optionally the system) will trust cmm's current CA.

    ``ok``/``detail``/``fix`` summarise the profiles for ``cmm status`` and ``cmm doctor``.
    """

    ca_cert: Path
    ca_exists: bool
    home: Path
    profiles: tuple[ProfileStatus, ...]
    system: SystemTrustStatus
    environment_value: str | None
    environment_ok: bool

    @property
    def profile_ok(self) -> bool:
        """Some profile makes new shells point NODE_EXTRA_CA_CERTS at the current CA."""
        return any(p.points_at_ca for p in self.profiles)

    @property
    def ok(self) -> bool:
        return self.ca_exists and self.profile_ok

    @property
    def detail(self) -> str:
        if not self.ca_exists:
            return f"no CA yet ({self.ca_cert})"
        good = [display(p.path, self.home) for p in self.profiles if p.points_at_ca]
        wrong = [
            f"{display(p.path, self.home)} sets it to {p.assignments[-1].value}"
            for p in self.profiles
            if p.assignments and not p.points_at_ca
        ]
        if good:
            text = f"{VARIABLE} → cmm's CA in {', '.join(good)}"
        else:
            text = f"no shell profile sets {VARIABLE} to cmm's CA"
        if wrong:
            text += f" ({'; '.join(wrong)})"
        store = self.system
        if store.store is not None and store.present:
            state = {True: "holds cmm's CA", False: "holds an older cmm CA", None: "holds a cmm CA"}[store.current]
            text += f"; system trust store {state}"
        return text

    @property
    def fix(self) -> str:
        if self.ok:
            return ""
        if not self.ca_exists:
            return "cmm setup"
        conflicting = [p for p in self.profiles if p.assignments and not p.points_at_ca and not p.managed]
        if conflicting:
            p = conflicting[0]
            return conflict_advice(p.path, [p.assignments[-1].value], self.ca_cert, self.home)
        return "cmm setup"


def trust_status(
    config_dir: Path,
    environ: Mapping[str, str] | None = None,
    *,
    machine: Machine | None = None,
    system: bool = True,
) -> TrustStatus:
    """Profile lines, the calling environment's NODE_EXTRA_CA_CERTS and the system store, for
    ``cmm status`` and ``cmm doctor``.  Changes nothing and needs no root.

    ``machine`` defaults to ``Machine.from_environ(environ)`` (tests pass a fake one);
    ``system=False`` skips the store, which may run ``trust list`` or ``security``.  A value
    "points at the CA" when it names ``<config_dir>/ca.crt`` or a PEM bundle that contains it.
    """
    if machine is None:
        machine = Machine.from_environ(os.environ if environ is None else environ)
    ca_cert = certs.certificate_paths(config_dir).ca_cert
    ca_pem = read_ca(ca_cert, machine)
    found = []
    with as_owner(machine):  # profiles may be links: read only what their owner could
        for profile in existing_profiles(machine.home):
            try:
                text = read_profile(profile.path)
            except OSError:
                continue
            settings = assignments(text, machine.home)
            ok = bool(settings) and points_at_ca(settings[-1].value, ca_cert, ca_pem)
            found.append(ProfileStatus(profile.path, settings, ok))
        env = machine.environment_value
        env_ok = env is not None and points_at_ca(env, ca_cert, ca_pem)
    store_status = system_status(detect_system_store(machine), ca_pem, machine) if system else SystemTrustStatus(None)
    return TrustStatus(
        ca_cert=ca_cert,
        ca_exists=ca_pem is not None,
        home=machine.home,
        profiles=tuple(found),
        system=store_status,
        environment_value=env,
        environment_ok=env_ok,
    )


# --- the configuration folder ------------------------------------------------------------------


@attrs.frozen
class Report:
    """Lines for stdout, warnings for stderr, and whether the command failed."""

    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    failed: bool = False


def conflict_advice(path: Path, others: Iterable[str], ca_cert: Path, home: Path) -> str:
    files = ", ".join(others)
    return (
        f"{display(path, home)} already sets {VARIABLE} to {files}, not cmm's CA; left it alone. "
        f"Node reads a single file, so combine them (cat {files} {ca_cert} > ~/.node-extra-ca.pem, "
        f"and point {VARIABLE} at that file) or choose one."
    )


def system_preflight(
    ca_cert: Path, machine: Machine, *, requested: bool, force: bool
) -> tuple[SystemStore | None, str | None]:
    """Before the certificates change: the store setup must update (or None), or an error that
    stops setup before anything is done.

    ``--system-trust`` needs a store and root.  Without it the store is only updated when it
    already trusts *this* folder's CA and setup replaces that CA (``--force``, expiry): a store
    entry made from another config folder is never touched.  ``--force`` then needs root too.
    """
    store = detect_system_store(machine)
    if requested:
        if store is None:
            return None, NO_STORE_MESSAGE
        if not machine.is_root:
            return None, "--system-trust needs root: run `sudo cmm setup --system-trust`"
        return store, None
    old = read_ca(ca_cert, machine)
    if store is None or old is None or not system_status(store, old, machine).current:
        return None, None
    if force and not machine.is_root:
        return None, (
            f"cmm's CA is in the system trust store ({store.describe()}) and --force replaces it: "
            "run `sudo cmm setup --force` so that the store gets the new CA too"
        )
    return store, None


def setup_trust(
    ca_cert: Path,
    machine: Machine,
    *,
    profile: bool,
    store: SystemStore | None = None,
    system_requested: bool = False,
    created_ca: bool = False,
) -> Report:
    """After the certificates are in place: the profiles, then the system store when asked for,
    or when it trusted the CA that was just replaced (``store`` from :func:`system_preflight`)."""
    lines: list[str] = []
    warnings: list[str] = []
    failed = False
    if profile:
        try:
            changes = install_profiles(ca_cert, machine)
        except OSError as error:
            warnings.append(f"cannot edit {error.filename or 'a shell profile'}: {error.strerror}")
            failed = True
            changes = ()
        for change in changes:
            if change.action is ProfileAction.CONFLICT:
                warnings.append(conflict_advice(change.path, change.others, ca_cert, machine.home))
            elif change.action is ProfileAction.FAILED:
                warnings.append(_failure_advice(change, machine))
                failed = True
            else:
                lines.append(f"shell profile {display(change.path, machine.home)}: {change.action.value}")
    if store is not None and (system_requested or created_ca):
        if not machine.is_root:
            warnings.append(
                f"the system trust store ({store.describe()}) still holds the previous cmm CA: "
                "run `sudo cmm setup --system-trust` to replace it"
            )
        else:
            try:
                lines.append(f"system trust store: {install_system_trust(store, ca_cert, machine)}")
            except (TrustError, OSError) as error:
                warnings.append(f"system trust store: {error}")
                failed = True
    return Report(tuple(lines), tuple(warnings), failed)


def uninstall_trust(ca_cert: Path, machine: Machine) -> Report:
    """Remove cmm's CA from the system store (first: it needs root, and may fail) and its lines
    from the profiles.  Stops at a system-store failure, so that nothing is half removed."""
    lines: list[str] = []
    warnings: list[str] = []
    store = detect_system_store(machine)
    if store is not None:
        try:
            done = remove_system_trust(store, machine, ca_cert)
        except TrustError as error:
            hint = "; run `sudo cmm uninstall`" if not machine.is_root else ""
            return Report((), (f"system trust store: {error}{hint}",), True)
        if done:
            lines.append(f"System trust store: {done}.")
    try:
        changes = remove_profiles(machine, ca_cert)
    except OSError as error:
        return Report(tuple(lines), (f"cannot edit {error.filename or 'a shell profile'}: {error.strerror}",), True)
    failed = False
    for change in changes:
        if change.action is ProfileAction.REMOVED:
            lines.append(f"Shell profile {display(change.path, machine.home)}: removed the {VARIABLE} line.")
        elif change.action is ProfileAction.FAILED:
            warnings.append(_failure_advice(change, machine))
            failed = True
        else:
            warnings.append(
                f"{display(change.path, machine.home)} still sets {VARIABLE} to {', '.join(change.others)} "
                "on a line cmm did not write; delete it yourself"
            )
    return Report(tuple(lines), tuple(warnings), failed)


def _failure_advice(change: ProfileChange, machine: Machine) -> str:
    shown = display(change.path, machine.home)
    reason = change.others[0] if change.others else "cannot be edited"
    link = f" (a link to {os.path.realpath(change.path)})" if change.path.is_symlink() else ""
    return (f"cannot edit {shown}{link} as its owner: {reason}; left it alone. "
            f"Add the {VARIABLE} line to it yourself, or make it a file of your own")
