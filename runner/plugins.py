"""Resolve plugin references and adapt every supported plugin shape to one calling form.

A reference is either an installed entry point name in the group `flowrun.plugins` or
`package.module:attribute`. Only references that a flow names are imported.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
import sysconfig
import traceback
from collections.abc import Awaitable, Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flowrun.errors import EXITS, PluginError

logger = logging.getLogger(__name__)

# Sync calls whose threads still run after their caller gave up on them.
_abandoned: set[Future[Any]] = set()


def abandoned_calls(wait: float = 0.0) -> int:
    """Return how many abandoned sync calls still run on their threads, after waiting up to `wait` seconds."""
    if wait > 0 and _abandoned:
        futures.wait(list(_abandoned), timeout=wait)
    return len(_abandoned)

ENTRY_POINT_GROUP = "flowrun.plugins"

def installed_plugins() -> list[importlib.metadata.EntryPoint]:
    """Return the entry points registered in the flowrun plugin group."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name)

def resolve(reference: str, search_path: Path | None = None) -> Any:
    """Import the object a plugin reference names; raise PluginError saying how to fix it."""
    if ":" in reference:
        return _import_attribute(reference, search_path)

    matches = [point for point in installed_plugins() if point.name == reference]
    if not matches:
        names = ", ".join(point.name for point in installed_plugins()) or "none installed"
        raise PluginError(
            reference,
            f"no installed entry point of that name in group '{ENTRY_POINT_GROUP}' (installed: {names}); "
            "use an installed name or write package.module:attribute",
        )
    try:
        return matches[0].load()
    except (Exception, *EXITS) as error:  # noqa: BLE001 - any import failure of user code is reported
        raise PluginError(reference, f"entry point {matches[0].value} failed to load: {_describe(error)}") from error

def _import_attribute(reference: str, search_path: Path | None) -> Any:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PluginError(reference, "expected package.module:attribute")

    if search_path is not None and str(search_path) not in sys.path:
        sys.path.insert(0, str(search_path))

    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise PluginError(
                reference,
                f"module '{error.name}' not found; install the package that provides it, "
                "or put the module next to the flow file",
            ) from None
        raise PluginError(reference, f"importing '{module_name}' failed: {_describe(error)}") from error
    except (Exception, *EXITS) as error:  # noqa: BLE001 - any import failure of user code is reported
        raise PluginError(reference, f"importing '{module_name}' failed: {_describe(error)}") from error

    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PluginError(reference, f"'{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    return target

def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def plugin_frame(error: BaseException) -> str | None:
    """Return `file:line` of the innermost traceback frame outside flowrun and the standard library, if any.

    Looks at the error, then at its cause (the exit that a PluginExit wraps), then at its context.
    """
    for candidate in (error, error.__cause__, error.__context__):
        if candidate is None:
            continue
        outside = [frame for frame in traceback.extract_tb(candidate.__traceback__)
                   if not frame.filename.startswith(_NOT_PLUGIN_CODE)]
        if outside:
            return f"{outside[-1].filename}:{outside[-1].lineno}"
    return None


# Folders of code that is not a plugin's: flowrun itself and the standard library.
_NOT_PLUGIN_CODE = (str(Path(__file__).resolve().parent) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)

def count_positional(function: Callable[..., Any]) -> tuple[int, int]:
    """Return the (required, maximum) positional parameter counts; maximum -1 means *args."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return (0, -1)

    required = 0
    maximum = 0
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            return (required, -1)
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            maximum += 1
            if parameter.default is parameter.empty:
                required += 1
    return (required, maximum)

class Invoker:
    """Calls a sync or async plugin function; sync calls run on a dedicated thread pool."""

    def __init__(self, name: str, threads: int) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._name = name
        self._threads = threads

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(function):
            return await function(*args)

        result = await self._run_in_thread(function, *args)
        if inspect.isawaitable(result):
            return await result
        return result

    async def _run_in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=f"flowrun-{self._name}")
        context = contextvars.copy_context()
        call = self._executor.submit(context.run, function, *args)
        try:
            return await asyncio.wrap_future(call)
        except asyncio.CancelledError:
            if not call.cancel():
                self._abandon(call)
            raise

    def _abandon(self, call: Future[Any]) -> None:
        """Give up on a call whose thread still runs it (a timeout or a stop cancelled the wait).

        The pool has one thread per concurrent call, so later calls would queue behind the
        stuck thread, and their own timeouts would run out while they wait. They get a new
        pool instead, and the old one ends once its threads return.
        """
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        _abandoned.add(call)
        call.add_done_callback(_abandoned.discard)
        logger.warning("a call of '%s' still runs on its thread after its caller stopped waiting for it "
                       "(handler_timeout or shutdown); later calls get new threads", self._name)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

class Handler:
    """A subscriber plugin in one shape: `setup`, `handle(message, context)`, `close`."""

    def __init__(self, reference: str, target: Any) -> None:
        self.reference = reference
        self.instance: Any = None
        self._setup: Callable[..., Any] | None = None
        self._close: Callable[..., Any] | None = None

        if inspect.isclass(target):
            try:
                self.instance = target()
            except (Exception, *EXITS) as error:  # noqa: BLE001 - constructor of user code
                raise PluginError(reference, f"creating {target.__name__}() failed: {_describe(error)}") from error
            target = self.instance

        if hasattr(target, "handle") and callable(target.handle):
            self.function: Callable[..., Any] = target.handle
            self._setup = getattr(target, "setup", None)
            self._close = getattr(target, "close", None)
        elif callable(target):
            self.function = target
        else:
            raise PluginError(reference, "is not callable and has no handle() method; a handler is handler(message, context)")

        required, maximum = count_positional(self.function)
        if required > 2 or maximum == 0:
            raise PluginError(reference, "a handler must accept (message, context) or (message)")
        self.takes_context = maximum == -1 or maximum >= 2
        self.is_async = inspect.iscoroutinefunction(self.function)

        # A handler annotated with a pydantic model gets the parsed payload instead of the Message.
        from flowrun.schemas import input_model

        self.input_model = input_model(self.function)
        self.consumes = self.input_model or getattr(target, "consumes", None)
        self.produces: dict[str, Any] = dict(getattr(target, "produces", None) or {})

    async def setup(self, invoker: Invoker, context: Any) -> None:
        if self._setup is not None:
            await invoker.call(self._setup, context)

    async def handle(self, invoker: Invoker, message: Any, context: Any) -> Any:
        if self.is_async:
            if self.takes_context:
                return await self.function(message, context)
            return await self.function(message)
        if self.takes_context:
            return await invoker.call(self.function, message, context)
        return await invoker.call(self.function, message)

    async def close(self, invoker: Invoker) -> None:
        if self._close is not None:
            await invoker.call(self._close)

class Producer:
    """A producer plugin in one shape: `setup`, `run(context)`, `close`."""

    def __init__(self, reference: str, target: Any) -> None:
        self.reference = reference
        self._setup: Callable[..., Any] | None = None
        self._close: Callable[..., Any] | None = None

        if inspect.isclass(target):
            try:
                target = target()
            except (Exception, *EXITS) as error:  # noqa: BLE001 - constructor of user code
                raise PluginError(reference, f"creating the producer failed: {_describe(error)}") from error

        if hasattr(target, "run") and callable(target.run):
            self.function: Callable[..., Any] = target.run
            self._setup = getattr(target, "setup", None)
            self._close = getattr(target, "close", None)
        elif callable(target):
            self.function = target
        else:
            raise PluginError(reference, "a producer is a callable given a context, or a class with run(context)")

        required, maximum = count_positional(self.function)
        if required > 1 or maximum == 0:
            raise PluginError(reference, "a producer is called with one argument, the context; "
                                         "define it as producer(context)")
        self.produces: dict[str, Any] = dict(getattr(target, "produces", None) or {})

    async def setup(self, invoker: Invoker, context: Any) -> None:
        if self._setup is not None:
            await invoker.call(self._setup, context)

    def start(self, context: Any) -> Any:
        """Call the producer; returns an iterator, an async iterator or an awaitable."""
        return self.function(context)

    async def close(self, invoker: Invoker) -> None:
        if self._close is not None:
            await invoker.call(self._close)

Loader = Callable[[str], Awaitable[Any]]
