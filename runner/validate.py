"""Check a loaded flow beyond its schema: references, plugins and the graph."""

from __future__ import annotations

import builtins
import difflib
import logging

from typing import Any

from pydantic import BaseModel, ValidationError

from flowrun import problems
from flowrun.brokers import BACKENDS, effective_spec
from flowrun.brokers.options import BACKEND_OPTIONS
from flowrun.errors import FlowrunError, Location, PluginError
from flowrun.graph import build_graph, label, subscriber, topic, topic_cycles
from flowrun.loader import LoadedFlow, read_flow_file
from flowrun.plugins import Handler, Producer, resolve
from flowrun.problems import Problem
from flowrun.durations import format_duration
from flowrun.schemas import SCHEMA_FILE_SUFFIXES, SchemaError, TopicSchema, fit_problems, load_topic_schema, model_schema
from flowrun.spec import AckPolicy, DeliveryMode, ErrorAction, SubscriberSpec

logger = logging.getLogger(__name__)

# Notes after a file's schema errors. The references are "topics and plugins", or "topics" with --no-import.
NOT_CHECKED = ("references to {references} were not checked because of the errors above; "
               "fix them and run flowrun validate again")
PARTLY_CHECKED = ("because of the errors above, only references to {references} were checked (not in "
                  "entries with an invalid or missing topic, plugin or publishes); fix the errors to check the rest")


def validate_file(path: str, import_plugins: bool = True) -> list[Problem]:
    """Load and check one flow file; return every problem found, sorted by position.

    A file with schema errors still gets its references checked where enough of it is
    valid, and a note after the errors names the checks that did not run.
    """
    reading = read_flow_file(path)
    if reading.flow is not None:
        return _by_position(check_flow(reading.flow, import_plugins))
    if not reading.file_read:
        return _by_position(reading.problems)

    references = "topics and plugins" if import_plugins else "topics"
    partial = reading.partial_flow()
    if partial is None:
        note = problems.note(Location(path), NOT_CHECKED.format(references=references))
        return _by_position(reading.problems) + [note]
    found = reading.problems + check_references(partial) + _check_plugin_references(partial, import_plugins)
    return _by_position(found) + [problems.note(Location(path), PARTLY_CHECKED.format(references=references))]


def _by_position(found: list[Problem]) -> list[Problem]:
    return sorted(found, key=lambda problem: (problem.location.line, problem.location.column))


def _check_plugin_references(flow: LoadedFlow, import_plugins: bool) -> list[Problem]:
    return check_plugins(flow) if import_plugins else check_schema_files(flow)


def check_flow(flow: LoadedFlow, import_plugins: bool = True) -> list[Problem]:
    """Check references, plugins and the graph of a flow that passed the schema."""
    found = check_references(flow)
    found += check_graph(flow)
    found += check_settings(flow)
    found += _check_plugin_references(flow, import_plugins)
    return found


def check_schema_files(flow: LoadedFlow) -> list[Problem]:
    """Without imports, still load the schemas that are files rather than models."""
    found: list[Problem] = []
    for name, topic_spec in flow.spec.topics.items():
        reference = topic_spec.schema_
        if reference is None or not reference.endswith(SCHEMA_FILE_SUFFIXES):
            continue
        try:
            load_topic_schema(name, reference, flow.path.parent)
        except SchemaError as error:
            found.append(problems.error(flow.locate_value("topics", name, "schema"), str(error)))
    return found


def _unknown_topic(flow: LoadedFlow, name: str, role: str) -> str:
    close = difflib.get_close_matches(name, list(flow.spec.topics), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else "; declare it under topics"
    return f"{role} undeclared topic '{name}'{hint}"


def check_references(flow: LoadedFlow) -> list[Problem]:
    spec = flow.spec
    found: list[Problem] = []

    for name, producer_spec in spec.producers.items():
        for index, target in enumerate(producer_spec.publishes):
            if target not in spec.topics:
                location = flow.locate("producers", name, "publishes", index)
                found.append(problems.error(location, _unknown_topic(flow, target, f"producer '{name}' publishes to")))

    for name, sub in spec.subscribers.items():
        if sub.topic not in spec.topics:
            location = flow.locate_value("subscribers", name, "topic")
            found.append(problems.error(location, _unknown_topic(flow, sub.topic, f"subscriber '{name}' consumes")))
        if sub.dead_letter is not None and sub.dead_letter not in spec.topics:
            location = flow.locate_value("subscribers", name, "dead_letter")
            role = f"dead_letter of subscriber '{name}' names"
            found.append(problems.error(location, _unknown_topic(flow, sub.dead_letter, role)))
        if sub.dead_letter is not None and sub.dead_letter == sub.topic:
            location = flow.locate_value("subscribers", name, "dead_letter")
            found.append(problems.error(location, f"subscriber '{name}' dead-letters into its own topic '{sub.topic}'; "
                                                  "choose another topic so failed messages stop looping"))
        for index, target in enumerate(sub.publishes):
            if target not in spec.topics:
                location = flow.locate("subscribers", name, "publishes", index)
                found.append(problems.error(location, _unknown_topic(flow, target, f"subscriber '{name}' publishes to")))
    return found


def check_graph(flow: LoadedFlow) -> list[Problem]:
    spec = flow.spec
    graph = build_graph(spec)
    found: list[Problem] = []

    order = [subscriber(name) for name in spec.subscribers] + [topic(name) for name in spec.topics]
    cycles = topic_cycles(graph, order)
    if cycles and not spec.allow_cycles:
        for cycle in cycles:
            path = " -> ".join(label(node) for node in cycle + cycle[:1])
            name = next(node[1] for node in cycle if node[0] == "subscriber")
            location = flow.locate("subscribers", name)
            found.append(problems.error(
                location,
                f"cycle {path}; if the loop is intended set 'allow_cycles: true' (max_hops, now {spec.max_hops}, "
                "then stops runaway messages)",
            ))

    for name in spec.topics:
        node = topic(name)
        consumers = [target for target in graph.successors(node)]
        if not consumers:
            found.append(problems.warning(flow.locate("topics", name),
                                          f"topic '{name}' has no subscribers, so its messages are counted and discarded"))
        feeders = [source for source in graph.predecessors(node)]
        if not feeders:
            found.append(problems.warning(flow.locate("topics", name),
                                          f"topic '{name}' has no producer or publishing subscriber"))
    return found


def check_broker(flow: LoadedFlow) -> list[Problem]:
    """Check the backend name and its options."""
    broker = flow.spec.broker
    try:
        effective_spec(broker)
    except FlowrunError as error:
        return [problems.error(flow.locate("broker"), str(error))]
    if broker.backend not in BACKEND_OPTIONS:
        return [problems.error(flow.locate_value("broker", "backend"),
                               f"unknown broker backend '{broker.backend}'; choose one of {', '.join(BACKENDS)}")]
    try:
        BACKEND_OPTIONS[broker.backend].model_validate(broker.options)
    except ValidationError as error:
        found = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            message = str(item["msg"]).removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                allowed = ", ".join(BACKEND_OPTIONS[broker.backend].model_fields) or "none"
                message = f"unknown option '{key}' for the {broker.backend} backend; allowed: {allowed}"
            else:
                message = f"invalid value for option '{key}' of the {broker.backend} backend: {message}"
            found.append(problems.error(flow.locate("broker", "options", *item["loc"]), message))
        return found
    return []


def check_timing(flow: LoadedFlow) -> list[Problem]:
    """Warn about timing settings with a concrete bad consequence."""
    found: list[Problem] = []
    consumed = {sub.topic for sub in flow.spec.subscribers.values()}

    for name, sub in flow.spec.subscribers.items():
        if sub.ack is AckPolicy.NONE:
            continue
        if sub.handler_timeout is not None and sub.ack_timeout < sub.handler_timeout:
            found.append(problems.warning(
                flow.locate_value("subscribers", name, "ack_timeout"),
                f"ack_timeout {format_duration(sub.ack_timeout)} of subscriber '{name}' is shorter than its "
                f"handler_timeout {format_duration(sub.handler_timeout)}: a slow handler's message is delivered "
                "again while the first call still runs (duplicate work); raise ack_timeout above handler_timeout",
            ))
        if sub.mode is DeliveryMode.PULL and sub.batch_size > sub.concurrency:
            slowest = sub.batch_size / sub.concurrency
            if sub.handler_timeout is not None and slowest * sub.handler_timeout > sub.ack_timeout:
                found.append(problems.warning(
                    flow.locate_value("subscribers", name, "batch_size"),
                    f"subscriber '{name}' fetches {sub.batch_size} messages for {sub.concurrency} handler slots; "
                    f"the last of a batch may wait {format_duration(slowest * sub.handler_timeout)}, past its "
                    f"ack_timeout {format_duration(sub.ack_timeout)}, and be delivered twice",
                ))
        if sub.max_deliveries > 100:
            found.append(problems.warning(
                flow.locate_value("subscribers", name, "max_deliveries"),
                f"subscriber '{name}' retries a failing message up to {sub.max_deliveries} times; a poison message "
                "occupies the subscription that long",
            ))
        if sub.dead_letter and sub.dead_letter in flow.spec.topics and sub.dead_letter not in consumed:
            found.append(problems.warning(
                flow.locate_value("subscribers", name, "dead_letter"),
                f"dead-letter topic '{sub.dead_letter}' of subscriber '{name}' has no subscriber, so dead letters "
                "are only visible through 'flowrun dlq'",
            ))
    return found


RABBITMQ_CONSUMER_TIMEOUT = 30 * 60.0


def check_backend_limits(flow: LoadedFlow) -> list[Problem]:
    """Warn where the chosen backend cannot honour a setting exactly."""
    try:
        backend = effective_spec(flow.spec.broker).backend
    except FlowrunError:
        return []

    found: list[Problem] = []
    if backend == "memory":
        found.append(problems.warning(flow.locate("broker"), "the memory backend loses waiting and unacked "
                                      "messages when the process exits; use sqlite (the default) to keep them"))
    for name, sub in flow.spec.subscribers.items():
        for key, message in _backend_limits(backend, sub):
            found.append(problems.warning(flow.locate("subscribers", name, key),
                                          f"subscriber '{name}' on the {backend} backend: {message}"))
    return found


def _backend_limits(backend: str, sub: SubscriberSpec) -> list[tuple[str, str]]:
    limits: list[tuple[str, str]] = []
    if backend == "rabbitmq":
        if sub.ordered:
            limits.append(("ordered", "per-key order holds within one process only"))
        if sub.retry.jitter:
            limits.append(("retry", "RabbitMQ expires messages only at the head of the retry queue, so with "
                                    "jitter a retry can be late by the longest delay queued before it"))
        if sub.ack_timeout > RABBITMQ_CONSUMER_TIMEOUT:
            limits.append(("ack_timeout", "RabbitMQ closes a channel that holds a delivery longer than its "
                                          "consumer_timeout (30 min by default); raise it on the server"))
    elif backend == "nats":
        if sub.ordered:
            limits.append(("ordered", "a retry holds back every key of the subscription, not only its own"))
    return limits


def check_error_routes(flow: LoadedFlow) -> list[Problem]:
    """Check `errors:` routes: the exception names and the dead_letter action's topic."""
    found: list[Problem] = []
    for name, sub in flow.spec.subscribers.items():
        for exception_name, action in sub.errors.items():
            location = flow.locate("subscribers", name, "errors", exception_name)
            if "." not in exception_name and not _is_builtin_exception(exception_name):
                found.append(problems.warning(location, (
                    f"'{exception_name}' in errors of subscriber '{name}' is not a built-in exception, so the route "
                    "never matches unless the name is qualified (package.module.ClassName)"
                )))
            if action is ErrorAction.DEAD_LETTER and sub.dead_letter is None:
                found.append(problems.warning(location, (
                    f"errors of subscriber '{name}' send {exception_name} to the dead-letter topic, but the "
                    "subscriber has no dead_letter topic, so those messages are dropped; set dead_letter"
                )))
    return found


def _is_builtin_exception(name: str) -> bool:
    candidate = getattr(builtins, name, None)
    return isinstance(candidate, type) and issubclass(candidate, BaseException)


def check_settings(flow: LoadedFlow) -> list[Problem]:
    """Warn about settings that have no effect or a surprising one."""
    found: list[Problem] = check_broker(flow) + check_timing(flow) + check_backend_limits(flow)
    found += check_error_routes(flow)
    for name, sub in flow.spec.subscribers.items():
        fields = sub.model_fields_set
        if sub.ack is AckPolicy.NONE:
            for key in ("dead_letter", "max_deliveries", "retry", "ack_timeout"):
                if key in fields:
                    found.append(problems.warning(flow.locate("subscribers", name, key),
                                                  f"'{key}' has no effect in subscriber '{name}' with ack: none "
                                                  "(at-most-once: messages are never redelivered)"))
        if sub.mode is DeliveryMode.PUSH:
            for key in ("batch_size", "max_wait"):
                if key in fields:
                    found.append(problems.warning(flow.locate("subscribers", name, key),
                                                  f"'{key}' applies to pull mode only; subscriber '{name}' is push"))
            if sub.max_in_flight is not None and sub.max_in_flight < sub.concurrency:
                found.append(problems.warning(flow.locate("subscribers", name, "max_in_flight"),
                                              f"max_in_flight {sub.max_in_flight} is below concurrency {sub.concurrency} "
                                              f"in subscriber '{name}', so {sub.concurrency - sub.max_in_flight} workers stay idle"))
        elif "max_in_flight" in fields:
            found.append(problems.warning(flow.locate("subscribers", name, "max_in_flight"),
                                          f"'max_in_flight' applies to push mode only; subscriber '{name}' is pull"))
    return found


def check_plugins(flow: LoadedFlow) -> list[Problem]:
    """Import every plugin the flow names, check its shape, then check schemas along edges."""
    found: list[Problem] = []
    search_path = flow.path.parent
    handlers: dict[str, Handler] = {}
    producers: dict[str, Producer] = {}

    for name, producer_spec in flow.spec.producers.items():
        try:
            producers[name] = Producer(producer_spec.plugin, resolve(producer_spec.plugin, search_path))
        except PluginError as error:
            found.append(problems.error(flow.locate_value("producers", name, "plugin"), str(error)))

    for name, subscriber_spec in flow.spec.subscribers.items():
        try:
            handlers[name] = Handler(subscriber_spec.plugin, resolve(subscriber_spec.plugin, search_path))
        except PluginError as error:
            found.append(problems.error(flow.locate_value("subscribers", name, "plugin"), str(error)))

    return found + check_schemas(flow, handlers, producers)


def load_schemas(flow: LoadedFlow) -> tuple[dict[str, TopicSchema], list[Problem]]:
    """Load every topic's schema; a schema that cannot be loaded is an error at its key."""
    schemas: dict[str, TopicSchema] = {}
    found: list[Problem] = []
    for name, topic_spec in flow.spec.topics.items():
        if topic_spec.schema_ is None:
            continue
        try:
            schemas[name] = load_topic_schema(name, topic_spec.schema_, flow.path.parent)
        except SchemaError as error:
            found.append(problems.error(flow.locate_value("topics", name, "schema"), str(error)))
    return schemas, found


def check_schemas(flow: LoadedFlow, handlers: dict[str, Handler], producers: dict[str, Producer]) -> list[Problem]:
    """Check that what plugins publish fits each topic's schema and what handlers expect is provided."""
    schemas, found = load_schemas(flow)

    for name, handler in handlers.items():
        sub = flow.spec.subscribers[name]
        if handler.input_model is not None and sub.ack is AckPolicy.EXPLICIT:
            found.append(problems.error(flow.locate_value("subscribers", name, "ack"),
                                        f"subscriber '{name}' receives a parsed {handler.input_model.__qualname__}, "
                                        "which cannot be acked; annotate the parameter as flowrun.Message or use ack: auto"))
        if handler.consumes is not None and sub.topic in schemas:
            topic_schema = schemas[sub.topic]
            for problem in fit_problems(topic_schema.json_schema, model_schema(handler.consumes)):
                found.append(problems.error(
                    flow.locate_value("subscribers", name, "topic"),
                    f"subscriber '{name}' expects {handler.consumes.__qualname__} but topic '{sub.topic}' "
                    f"({topic_schema.reference}) does not guarantee it: {problem}",
                ))
        found += _check_produces(flow, "subscribers", name, handler.produces, schemas)

    for name, producer in producers.items():
        found += _check_produces(flow, "producers", name, producer.produces, schemas)
    return found


def _check_produces(
    flow: LoadedFlow, section: str, name: str, produces: dict[str, Any], schemas: dict[str, TopicSchema]
) -> list[Problem]:
    found: list[Problem] = []
    noun = section.rstrip("s")
    for topic_name, model in produces.items():
        if topic_name not in schemas or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        topic_schema = schemas[topic_name]
        for problem in fit_problems(model_schema(model), topic_schema.json_schema):
            found.append(problems.error(
                flow.locate_value(section, name, "plugin"),
                f"{noun} '{name}' publishes {model.__qualname__} to topic '{topic_name}', which does not fit "
                f"the topic's schema ({topic_schema.reference}): {problem}",
            ))
    return found
