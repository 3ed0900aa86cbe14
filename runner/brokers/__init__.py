"""Broker backends, one module each, chosen by name or by FLOWRUN_BROKER_URL.

Each backend class provides `from_spec(spec, options, flow_path, flow_name, clock)`;
client libraries are imported only when their backend is used.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flowrun.broker import Broker
from flowrun.brokers.options import BACKEND_OPTIONS
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.errors import FlowrunError
from flowrun.spec import BrokerSpec

BACKEND_CLASSES = {
    "sqlite": ("flowrun.brokers.sqlite", "SqliteBroker"),
    "memory": ("flowrun.brokers.memory", "MemoryBroker"),
    "redis": ("flowrun.brokers.redis", "RedisBroker"),
    "rabbitmq": ("flowrun.brokers.rabbitmq", "RabbitmqBroker"),
    "nats": ("flowrun.brokers.nats", "NatsBroker"),
}
BACKENDS = tuple(BACKEND_CLASSES)
URL_SCHEMES = {
    "sqlite": "sqlite",
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "nats": "nats",
    "tls": "nats",
}
NETWORK_BACKENDS = ("redis", "rabbitmq", "nats")
BROKER_URL_VARIABLE = "FLOWRUN_BROKER_URL"
STATE_FOLDER = ".flowrun"


def effective_spec(spec: BrokerSpec, environment: Mapping[str, str] | None = None) -> BrokerSpec:
    """Apply FLOWRUN_BROKER_URL, which overrides the flow's backend and URL."""
    environment = os.environ if environment is None else environment
    url = environment.get(BROKER_URL_VARIABLE, "").strip()
    if not url:
        return spec

    backend = backend_for_url(url)
    if backend == "sqlite":
        path = url.removeprefix("sqlite://") or None
        return spec.model_copy(update={"backend": backend, "path": path, "url": None,
                                       "options": spec.options if spec.backend == backend else {}})
    options = spec.options if spec.backend == backend else {}
    return spec.model_copy(update={"backend": backend, "url": url, "options": options})


def backend_for_url(url: str) -> str:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as error:
        raise FlowrunError(f"invalid broker URL in {BROKER_URL_VARIABLE} ({redact_url(url)}): {error}") from None
    if scheme not in URL_SCHEMES:
        raise FlowrunError(
            f"invalid broker URL scheme '{scheme}' in {BROKER_URL_VARIABLE} ({redact_url(url)}); "
            f"use one of {', '.join(sorted(URL_SCHEMES))}"
        )
    return URL_SCHEMES[scheme]


_CREDENTIALS = re.compile(r"(?P<user>[^/:@]*):[^@/]*@")


def redact_url(url: str) -> str:
    """Hide the password of a URL so it can appear in logs and errors, even a malformed one."""
    try:
        parts = urlsplit(url)
        password = parts.password
        port = parts.port
    except ValueError:
        return _CREDENTIALS.sub(r"\g<user>:***@", url)
    if password is None:
        return _CREDENTIALS.sub(r"\g<user>:***@", url)
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def create_broker(spec: BrokerSpec, flow_path: Path, flow_name: str, clock: Clock = SYSTEM_CLOCK) -> Broker:
    """Build the backend a flow's broker section (or FLOWRUN_BROKER_URL) names."""
    spec = effective_spec(spec)
    if spec.backend not in BACKEND_CLASSES:
        raise FlowrunError(f"unknown broker backend '{spec.backend}'; available: {', '.join(BACKENDS)}")
    if spec.backend in NETWORK_BACKENDS and not spec.url:
        raise FlowrunError(f"the {spec.backend} backend needs broker.url in the flow or {BROKER_URL_VARIABLE}")
    if spec.url:
        _check_port(spec.url)

    module_name, class_name = BACKEND_CLASSES[spec.backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise FlowrunError(f"the {spec.backend} backend is not part of this flowrun installation") from None
        raise FlowrunError(
            f"the {spec.backend} backend needs the package '{error.name}'; install it with "
            f"pip install 'flowrun[{spec.backend}]' (in a clone of the repository: "
            f"pip install -e '.[{spec.backend}]')"
        ) from None

    options = BACKEND_OPTIONS[spec.backend].model_validate(spec.options)
    broker: Broker = getattr(module, class_name).from_spec(spec, options, flow_path, flow_name, clock)
    return broker


def _check_port(url: str) -> None:
    """Raise FlowrunError when the URL's port is not a number or out of range."""
    try:
        urlsplit(url).port
    except ValueError as error:
        source = BROKER_URL_VARIABLE if os.environ.get(BROKER_URL_VARIABLE, "").strip() else "broker.url of the flow"
        raise FlowrunError(
            f"invalid port in the broker URL {redact_url(url)} ({source}): {error}; "
            "write the port as a number from 1 to 65535, for example redis://127.0.0.1:6379/0"
        ) from None


def sqlite_path(spec: BrokerSpec, flow_path: Path, flow_name: str) -> Path:
    """Return the database file: `path` relative to the flow file, else .flowrun/NAME.db beside it."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return path if path.is_absolute() else flow_path.parent / path
    return flow_path.parent / STATE_FOLDER / f"{flow_name}.db"
