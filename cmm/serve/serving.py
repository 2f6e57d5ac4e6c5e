"""One serving unit: settings, upstream pool and connector, wired into a ProxyContext.

The same unit serves inside the master (``--workers 0``) and in every worker process.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from cmm.core.values import ProxySettings
from cmm.serve.proxy import ProxyContext, fit_open_files
from cmm.core.records import RequestRecord
from cmm.serve.resolve import AddressBook
from cmm.serve.upstream import Connector, Pool, TrustRoot, anthropic_tls_options

log = Logger()


def build_context(settings: ProxySettings, addresses: AddressBook, connect_timeout: float, reactor: Any,
                  record: Callable[[RequestRecord], None], anthropic_trust: TrustRoot | None = None) -> ProxyContext:
    connector = Connector(
        reactor=reactor,
        anthropic_addresses=addresses.current,
        anthropic_tls=anthropic_tls_options(anthropic_trust),
        connect_timeout=connect_timeout,
    )
    budget = fit_open_files(settings.max_connections)  # raised once, at start
    if budget < settings.max_connections:
        log.warn("The open-file limit has room for {budget} client connections, not --max-connections {wanted}",
                 budget=budget, wanted=settings.max_connections)
    return ProxyContext(settings=settings, pool=Pool(connector.connect, reactor), clock=reactor, record=record,
                        connection_budget=budget)
