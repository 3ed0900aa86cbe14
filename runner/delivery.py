"""Run one subscription: take deliveries (push or pull), call the handler, settle the result.

The ack policy is applied here and only here:

- `auto`: ack when the handler returns, nack with the error when it raises, unless the
  handler settled the message itself;
- `explicit`: the handler calls `message.ack()` or `message.nack()`; a handler that raises
  before settling is nacked; one that returns unsettled leaves the message in flight until
  the ack timeout redelivers it;
- `none`: the broker removed the message on delivery; success counts as acked, an error
  as dropped.

Acks and nacks are collected for one event-loop turn and sent to the broker as a batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import traceback
from collections import deque
from typing import Any

from pydantic import ValidationError

from flowrun.broker import Broker, ErrorInfo, FetchConsumer, FetchFailures, Nack, SubscriptionConfig, fetch_or_back_off
from flowrun.context import Context, HandlerCall, current_call
from flowrun.errors import EXITS, BrokerError, HopLimitError, PayloadError, PluginExit, UndeclaredTopicError
from flowrun.logs import RepeatLimiter
from flowrun.message import ACKED, HOPS_HEADER, Delivery, Message, Outcome, loop_call
from flowrun.plugins import Handler, Invoker
from flowrun.schemas import describe_validation_error
from flowrun.spec import AckPolicy, DeliveryMode, ErrorAction, SubscriberSpec

logger = logging.getLogger(__name__)

TRACEBACK_CHARS = 4000
# How long a stop waits for workers after cancelling them (a handler may catch the cancellation).
CANCEL_GRACE_SECONDS = 1.0
# Deliveries waiting for a worker must be handled within this share of the ack timeout.
WINDOW_SHARE_OF_ACK_TIMEOUT = 0.5
# Weight of a handler call shorter than the running mean. A longer call replaces the mean
# at once, so the window shrinks as soon as the handler slows down.
DURATION_WEIGHT = 0.2
# A delivery that waited for a worker is handled only if 1.25 x its wait plus the mean
# handler duration stays within the ack timeout. The factor covers waits that the mean
# does not predict.
WAIT_SAFETY_FACTOR = 1.25
# Errors for which another delivery cannot help: they go straight to the dead-letter topic.
TERMINAL_ERRORS: tuple[type[BaseException], ...] = (HopLimitError, PayloadError, UndeclaredTopicError)


def describe_error(error: BaseException) -> ErrorInfo:
    """Summarise an exception for dead-letter headers, keeping the end of the traceback."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(error))
    if len(text) > TRACEBACK_CHARS:
        text = "..." + text[-TRACEBACK_CHARS:]
    return ErrorInfo(name, str(error) or name, text)


def describe_settle_without_error(outcome: Outcome, delivery_count: int, max_deliveries: int) -> ErrorInfo:
    """Describe a handler's `nack()`, `reject()` or `drop()` call that gave no error.

    Dead-letter headers and drop logs show this in place of an exception.
    """
    if not outcome.terminal:
        kind, call = "flowrun.Nacked", "nack()"
    elif outcome.dead_letter:
        kind, call = "flowrun.Rejected", "reject()"
    else:
        kind, call = "flowrun.Dropped", "drop()"
    return ErrorInfo(kind, f"the handler called {call} without an error on delivery {delivery_count} "
                           f"(max_deliveries {max_deliveries})")


class SettleBatcher:
    """Collects acks and nacks for one loop turn, then sends each kind as one broker call."""

    def __init__(self, broker: Broker, subscription: str) -> None:
        self._broker = broker
        self._subscription = subscription
        self._acks: list[Any] = []
        self._nacks: list[Nack] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def ack(self, tag: Any) -> None:
        self._acks.append(tag)
        if not self._scheduled:
            self._schedule()

    def nack(self, nack: Nack) -> None:
        self._nacks.append(nack)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        acks, self._acks = self._acks, []
        nacks, self._nacks = self._nacks, []
        task = asyncio.ensure_future(self._send(acks, nacks))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, acks: list[Any], nacks: list[Nack]) -> None:
        try:
            if acks:
                await self._broker.ack(self._subscription, acks)
            if nacks:
                await self._broker.nack(self._subscription, nacks)
        except Exception:
            # The broker keeps unsettled messages in flight, so the ack timeout redelivers them.
            logger.exception("settling %d acks and %d nacks on '%s' failed", len(acks), len(nacks), self._subscription)

    @property
    def busy(self) -> bool:
        return self._scheduled or bool(self._tasks)

    async def drain(self) -> None:
        while self.busy:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)


class SubscriptionWorker:
    """Delivers one subscription's messages to its handler under the subscription's policies.

    A feeder (the broker's push consumer, or the pull loop) puts deliveries on a local
    queue, and `concurrency` long-lived worker tasks take them from it, so no task is
    created per message.
    """

    def __init__(
        self,
        name: str,
        spec: SubscriberSpec,
        config: SubscriptionConfig,
        broker: Broker,
        handler: Handler,
        context: Context,
        max_hops: int,
    ) -> None:
        self.name = name
        self.spec = spec
        self.config = config
        self.broker = broker
        self.handler = handler
        self.context = context
        self.max_hops = max_hops
        self.invoker = Invoker(name, spec.concurrency)
        self.batcher = SettleBatcher(broker, name)
        self.active = 0
        self.handled = 0
        self.failed = 0
        # Fetched deliveries waiting for a worker, each with the monotonic time it arrived.
        # Workers sleep on `_has_work` when it is empty.
        self._ready: deque[tuple[Delivery, float]] = deque()
        self._has_work = asyncio.Event()
        self._mean_duration: float | None = None
        # With the push window at max_in_flight, a call no longer than this (the mean then)
        # changes nothing, so the window is not recomputed. -inf below max_in_flight.
        self._steady_below = -math.inf
        self._auto_ack = spec.ack is not AckPolicy.EXPLICIT
        # An async handler without a timeout or an input model is awaited directly.
        self._direct = handler.is_async and spec.handler_timeout is None and handler.input_model is None
        # Maximum wait for a worker after which a delivery still finishes within its lease:
        # WAIT_SAFETY_FACTOR x wait + mean handler duration <= ack timeout. `ack: none` has no lease.
        self._safe_wait = config.ack_timeout / WAIT_SAFETY_FACTOR if config.ack is not AckPolicy.NONE else math.inf
        # Set after each handled delivery while `finish` waits for the last ones.
        self._settled_locally = asyncio.Event()
        self._finishing = False
        # Set when finish() cancels the workers, so that one whose handler swallowed the
        # cancellation ends after that call instead of waiting for more work.
        self._stopped = False
        self._pulled = 0
        self._capacity = asyncio.Event()
        self._consumer: FetchConsumer | None = None
        self._pull_task: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._failures = FetchFailures()
        self._errors = RepeatLimiter(logger, broker.clock)
        self._loop = asyncio.get_running_loop()

    # Lifecycle

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"flowrun-handler-{self.name}-{index}")
            for index in range(self.spec.concurrency)
        ]
        if self.spec.mode is DeliveryMode.PUSH:
            window = self._fetch_limit(self.spec.effective_max_in_flight)
            self._consumer = self.broker.consume(self.name, self._enqueue, window)
            # No delivery waits for a worker until the handler's speed is known.
            self._consumer.set_limit(self.spec.concurrency)
        else:
            self._pull_task = asyncio.create_task(self._pull_loop(), name=f"flowrun-pull-{self.name}")
        logger.info("subscriber '%s' started on topic '%s' (%s, ack %s)", self.name, self.spec.topic,
                    self.spec.mode.value, self.spec.ack.value)

    def _fetch_limit(self, limit: int) -> int:
        """Cap how many deliveries may wait here: under ack: none, only what workers can start now.

        The broker removes an `ack: none` message as it delivers it, so one that waits here
        when the flow stops cannot go back and is lost.
        """
        if self.config.ack is AckPolicy.NONE:
            return self.spec.concurrency
        return limit

    async def stop_fetching(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._pull_task is not None:
            self._pull_task.cancel()
            try:
                await self._pull_task
            except asyncio.CancelledError:
                pass
            self._pull_task = None

    async def finish(self, timeout: float) -> int:
        """Hand back deliveries not started, let running ones finish within `timeout`.

        Returns how many running deliveries did not finish in time. Call it after
        `stop_fetching`, so no new delivery arrives meanwhile.
        """
        deadline = self.broker.clock.monotonic() + timeout
        self._finishing = True
        await self._give_back_waiting()
        while self._ready or self.active:
            remaining = deadline - self.broker.clock.monotonic()
            if remaining <= 0:
                break
            self._settled_locally.clear()
            await self.broker.clock.wait(self._settled_locally, remaining)

        unfinished = len(self._ready) + self.active
        self._stopped = True
        for worker in self._workers:
            worker.cancel()
        # A handler that catches the cancellation runs on; its worker ends after that call.
        running: set[asyncio.Task[None]] = set()
        if self._workers:
            _, running = await asyncio.wait(self._workers, timeout=CANCEL_GRACE_SECONDS)
        if running:
            logger.warning("%d handler calls of '%s' caught their cancellation and still run %gs later; the flow "
                           "stops without their results, so their messages are delivered again", len(running),
                           self.name, CANCEL_GRACE_SECONDS)
        self._workers = []

        await self._give_back_waiting()
        return unfinished

    async def _give_back_waiting(self) -> None:
        """Return the fetched deliveries that no worker started, instead of letting them wait out their lease."""
        tags = [delivery.tag for delivery, _ in self._ready]
        self._ready.clear()
        if not tags:
            return
        try:
            await self.broker.give_back(self.name, tags)
        except BrokerError as error:
            logger.warning("returning %d fetched messages of '%s' failed, so they are delivered again after "
                           "their ack timeout: %s", len(tags), self.name, error)

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._ready and not self.batcher.busy

    # Taking deliveries

    def _enqueue(self, delivery: Delivery) -> None:
        # Workers clear `_has_work` only when `_ready` is empty, so it is set already unless
        # this is the first delivery waiting.
        if not self._ready:
            self._has_work.set()
        self._ready.append((delivery, self.broker.clock.monotonic()))

    async def _work(self) -> None:
        # A handler that does not suspend lets one worker run through every waiting
        # delivery in one event-loop turn. The push window bounds how many that is.
        # Bound once here: this loop runs once per delivery.
        ready = self._ready
        monotonic = self.broker.clock.monotonic
        on_settle = self._on_settle
        invoke = self._invoke
        ack = self.batcher.ack
        while not self._stopped:
            if not ready:
                self._has_work.clear()
                await self._has_work.wait()
                continue

            delivery, arrived = ready.popleft()
            started = monotonic()
            try:
                if started - arrived > self._safe_wait:
                    self._log_lease_ran_out(delivery, started - arrived)
                    continue
                message = Message(delivery, on_settle)
                self.active += 1
                try:
                    error = await invoke(message, delivery.envelope.headers)
                finally:
                    self.active -= 1
                if self._consumer is not None:
                    duration = monotonic() - started
                    if duration > self._steady_below:
                        self._resize_window(duration)
                if error is None:
                    self.handled += 1
                    if self._auto_ack and message.claim(ACKED):
                        ack(delivery.tag)
                else:
                    self._conclude(message, error)
            finally:
                if self._pull_task is not None:
                    self._pulled -= 1
                    self._capacity.set()
                if self._finishing:
                    self._settled_locally.set()

    def _log_lease_ran_out(self, delivery: Delivery, waited: float) -> None:
        """Log a delivery that waited past `_safe_wait` and so is skipped.

        The broker delivers such a message again, or already did, so handling this copy
        would handle the message twice. It is left unsettled.
        """
        self._errors.warning(
            "lease ran out",
            "message %s of '%s' waited %.2fs for a worker and cannot finish within its ack timeout of %gs, "
            "so it is not handled here and the broker delivers it again; a handler that slowed down "
            "causes this, and a lower max_in_flight or a longer ack_timeout avoids it",
            delivery.envelope.id, self.name, waited, self.config.ack_timeout,
        )

    async def _pull_loop(self) -> None:
        # Fetched messages wait for a free worker, so a batch larger than the concurrency
        # is handled a few at a time while its leases run.
        capacity = self._fetch_limit(max(self.spec.batch_size, self.spec.concurrency))
        while True:
            free = capacity - self._pulled
            if free <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue

            batch = min(self.spec.batch_size, free)
            deliveries = await fetch_or_back_off(self.broker, self.name, batch, self.spec.max_wait, self._failures)
            self._pulled += len(deliveries)
            for delivery in deliveries:
                self._enqueue(delivery)

    # Handling one delivery

    def _conclude(self, message: Message, error: BaseException | None) -> None:
        if error is None:
            self.handled += 1
        else:
            self.failed += 1
            self._errors.warning(
                type(error).__name__,
                "handler of '%s' failed on message %s (delivery %d): %s",
                self.name, message.id, message.delivery_count, error,
            )
        self._apply_policy(message, error)

    async def _invoke(self, message: Message, headers: dict[str, str]) -> BaseException | None:
        """Call the handler; return the error it raised, or that one of its publishes raised."""
        call = HandlerCall(_hops_of(headers) if headers else 0)
        token = current_call.set(call)
        try:
            if not self._direct:
                await self._call_handler(self._argument(message))
            elif self.handler.takes_context:
                await self.handler.function(message, self.context)
            else:
                await self.handler.function(message)
            error: BaseException | None = None
        except Exception as raised:  # noqa: BLE001 - every handler error is settled, not raised
            error = raised
        except EXITS as raised:
            error = PluginExit(raised)
        finally:
            current_call.reset(token)

        # Publishes the handler started but did not await must be stored before the ack.
        if call.publishes:
            for outcome in await asyncio.gather(*call.publishes, return_exceptions=True):
                if isinstance(outcome, BaseException) and error is None:
                    error = outcome
        return error

    async def _call_handler(self, argument: Any) -> None:
        timeout = self.spec.handler_timeout
        if timeout is None:
            await self.handler.handle(self.invoker, argument, self.context)
            return
        try:
            async with asyncio.timeout(timeout):
                await self.handler.handle(self.invoker, argument, self.context)
        except TimeoutError:
            raise TimeoutError(f"handler did not finish within handler_timeout {timeout:g}s") from None

    def _argument(self, message: Message) -> Any:
        """The Message, or its payload parsed into the model the handler is annotated with."""
        model = self.handler.input_model
        if model is None:
            return message
        try:
            return model.model_validate_json(message.body, strict=True)
        except ValidationError as error:
            raise PayloadError(
                f"message {message.id} on topic '{message.topic}' does not match {model.__qualname__}, "
                f"the input type of subscriber '{self.name}': {describe_validation_error(error)}"
            ) from None

    def _resize_window(self, duration: float) -> None:
        """Fit the push window to the handler's speed, so no fetched delivery waits out its lease.

        The broker's ack timeout runs from the fetch, also while a delivery waits here for a
        worker. The window starts at the concurrency and grows up to max_in_flight as long as
        a full window is handled within half the ack timeout.
        """
        assert self._consumer is not None
        mean = self._mean_duration
        if mean is not None and duration <= mean:
            mean += DURATION_WEIGHT * (duration - mean)
            self._mean_duration = mean
        else:
            mean = duration
            self._mean_duration = mean
        if self.config.ack is not AckPolicy.NONE:
            self._safe_wait = max(self.config.ack_timeout - mean, 0.0) / WAIT_SAFETY_FACTOR

        budget = self.config.ack_timeout * WINDOW_SHARE_OF_ACK_TIMEOUT * self.spec.concurrency
        fits = int(budget / mean) if mean > 0 else self.spec.effective_max_in_flight
        limit = min(max(fits, self.spec.concurrency), self._consumer.max_in_flight)
        if limit != self._consumer.limit:
            self._consumer.set_limit(limit)
        # At max_in_flight a shorter mean only lengthens the safe wait, so the last one is
        # kept (a little stricter) until a slower call comes.
        self._steady_below = mean if limit == self._consumer.max_in_flight else -math.inf

    def _apply_policy(self, message: Message, error: BaseException | None) -> None:
        if error is not None:
            action = self._error_action(error)
            if action is ErrorAction.DEAD_LETTER:
                message.reject(error)
            elif action is ErrorAction.DROP:
                message.drop(error)
            else:
                message.nack(error=error)
            return

        if self.spec.ack is not AckPolicy.EXPLICIT and message.claim(ACKED):
            self.batcher.ack(message.delivery.tag)

    def _error_action(self, error: BaseException) -> ErrorAction:
        """Look up the error's class, then its bases, in the subscription's error routes."""
        routes = self.spec.errors
        for kind in type(error).__mro__:
            for name in (f"{kind.__module__}.{kind.__qualname__}", kind.__qualname__):
                if name in routes:
                    return routes[name]
        if isinstance(error, TERMINAL_ERRORS):
            return ErrorAction.DEAD_LETTER
        return ErrorAction.RETRY

    def _on_settle(self, message: Message, outcome: Outcome) -> None:
        tag = message.delivery.tag
        if outcome.acked:
            loop_call(self._loop, lambda: self.batcher.ack(tag))
            return

        if outcome.error is not None:
            info = describe_error(outcome.error)
        else:
            info = describe_settle_without_error(outcome, message.delivery_count, self.config.max_deliveries)
        nack = Nack(tag, outcome.delay, info, outcome.terminal, outcome.dead_letter)
        loop_call(self._loop, lambda: self.batcher.nack(nack))

    async def close(self) -> None:
        await self.batcher.drain()
        self.invoker.shutdown()
        self._errors.flush()


def _hops_of(headers: dict[str, str]) -> int:
    hops = headers.get(HOPS_HEADER)
    if hops is None:
        return 0
    try:
        return int(hops)
    except ValueError:
        return 0
