"""The messages between the master and its workers: one JSON object a line, both ways.

Master → worker (the worker's stdin): ``config`` (settings, key material, addresses) at start
and after every reload, and ``cooldown`` for every worker when one met one. Worker → master
(the worker's stdout): ``records`` (request records in batches, one line for many; a single
``request`` is still read), ``log`` lines, ``gauges`` and the ``cooldown`` it met. Key material
travels in the pipe so that an unprivileged worker never needs to read the root-owned or
user-only key file itself.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Sequence

import attrs

from cmm.core.failover import Cooldown
from cmm.core.values import Destination, ProxySettings
from cmm.core.records import RequestRecord
from cmm.core.router import Mapping, Router, Upstream


@attrs.frozen
class WorkerConfig:
    """Everything a worker needs to serve; replaced whole on reload."""

    proxy: ProxySettings
    cert_pem: bytes
    key_pem: bytes
    anthropic_addresses: tuple[str, ...]
    connect_timeout: float


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not a cmm message")
    return message


def config_message(config: WorkerConfig) -> dict[str, Any]:
    proxy = attrs.asdict(config.proxy)
    return {
        "type": "config",
        "proxy": proxy,
        "cert_pem": config.cert_pem.decode(),
        "key_pem": config.key_pem.decode(),
        "anthropic_addresses": list(config.anthropic_addresses),
        "connect_timeout": config.connect_timeout,
    }


def config_from_message(message: dict[str, Any]) -> WorkerConfig:
    proxy = dict(message["proxy"])
    mappings = tuple(_mapping(m) for m in proxy.pop("router")["mappings"])
    settings = ProxySettings(router=Router(mappings), anthropic=Destination(**proxy.pop("anthropic")), **proxy)
    return WorkerConfig(
        proxy=settings,
        cert_pem=message["cert_pem"].encode(),
        key_pem=message["key_pem"].encode(),
        anthropic_addresses=tuple(message["anthropic_addresses"]),
        connect_timeout=float(message["connect_timeout"]),
    )


def _mapping(fields: dict[str, Any]) -> Mapping:
    """JSON has no tuples: the mapping's sequences come back as lists."""
    fields = dict(fields)
    upstream = Upstream(**fields.pop("upstream"))
    for name in ("fallback_on", "request_class"):
        fields[name] = tuple(fields.get(name, ()))
    fields["headers"] = tuple(tuple(pair) for pair in fields.get("headers", ()))
    return Mapping(upstream=upstream, **fields)


def gauges_message(values: dict[str, int]) -> dict[str, Any]:
    return {"type": "gauges", "values": dict(values)}


def gauges_from_message(message: dict[str, Any]) -> dict[str, int]:
    """A worker's gauges: named counts, nothing else (they end up in ``cmm status``)."""
    values = message["values"]
    if not isinstance(values, dict) or not all(
            isinstance(key, str) and type(value) is int for key, value in values.items()):
        raise ValueError("gauges must be named whole numbers")
    return values


def cooldown_message(cooldown: Cooldown) -> dict[str, Any]:
    return {"type": "cooldown", "rule": cooldown.rule, "until": cooldown.until, "cause": cooldown.cause}


def cooldown_from_message(message: dict[str, Any]) -> Cooldown:
    """A cool-down either way; ValueError for anything else."""
    rule, until, why = message.get("rule"), message.get("until"), message.get("cause")
    if not isinstance(rule, str) or not isinstance(why, str) or not isinstance(until, (int, float)) \
            or isinstance(until, bool):
        raise ValueError("a cool-down is a rule, a time and a cause")
    return Cooldown(rule, float(until), why)


def request_message(record: RequestRecord) -> dict[str, Any]:
    return {"type": "request", "record": attrs.asdict(record)}


def record_from_message(message: dict[str, Any]) -> RequestRecord:
    return RequestRecord(**message["record"])


RECORD_FIELDS = tuple(field.name for field in attrs.fields(RequestRecord))
_RECORD_FIELD_LIST = list(RECORD_FIELDS)  # as a message's field names decode
_record_values = operator.attrgetter(*RECORD_FIELDS)


def records_message(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Many records in one message: the field names once, then one row of values per record
    (a flat record's values, without attrs.asdict's recursion; a busy worker sends thousands)."""
    return {"type": "records", "fields": list(RECORD_FIELDS), "rows": [_record_values(r) for r in records]}


def records_from_message(message: dict[str, Any]) -> list[RequestRecord]:
    fields = message["fields"]
    rows = message["rows"]
    if not isinstance(fields, list) or not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == len(fields) for row in rows):
        raise ValueError("records must be rows as long as the field names")
    if fields == _RECORD_FIELD_LIST:  # this version's own order (the usual case): the values as they stand
        return [RequestRecord(*row) for row in rows]
    return [RequestRecord(**dict(zip(fields, row))) for row in rows]
