"""Billing: charge each placed order through the PaymentGateway and publish the outcome.

Published payloads (topic names from the `succeeded_topic` and `failed_topic` options):

- PaymentSucceeded: {"invoice", "customer_id", "amount", "currency": "GBP", "charged"}.
  `charged` is false, with amount "0.00", when the total is zero or negative, because
  there is nothing to charge.
- PaymentFailed: {"invoice", "customer_id", "amount", "reason": "declined"}.

A transient gateway error propagates as GatewayUnavailable, so flowrun nacks the message
and retries it with backoff until the subscription's max_deliveries, then dead-letters it.
Gateway options (`latency`, `failure_rate`, `decline_rate`, `seed`) are in gateway.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from flowrun_plugins.orders import schemas
from flowrun_plugins.orders.errors import InvalidPayloadError
from flowrun_plugins.orders.gateway import ChargeDecision, GatewaySettings, PaymentGateway
from flowrun_plugins.orders.money import format_amount, invoice_total

if TYPE_CHECKING:
    from flowrun import Context, Message

logger = logging.getLogger(__name__)

CURRENCY = "GBP"


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """The charge for one order. `customer_id` is None for a guest order."""

    invoice: str
    customer_id: str | None
    amount: Decimal


def charge_request(order: Any) -> ChargeRequest:
    """Build the charge of an OrderPlaced payload, or raise InvalidPayloadError naming the field."""
    if not isinstance(order, Mapping):
        raise InvalidPayloadError(
            f"invalid OrderPlaced payload: expected an object, found {type(order).__name__}"
        )

    invoice = order.get("invoice")
    if not isinstance(invoice, str) or not invoice:
        raise InvalidPayloadError(f"invalid OrderPlaced payload: invalid invoice {invoice!r}")

    lines = order.get("lines")
    if not isinstance(lines, list):
        raise InvalidPayloadError(
            f"invalid OrderPlaced payload for invoice {invoice}: lines is not a list"
        )

    try:
        amount = invoice_total(lines)
    except InvalidPayloadError as error:
        raise InvalidPayloadError(
            f"invalid OrderPlaced payload for invoice {invoice}: {error}"
        ) from None

    customer_id = order.get("customer_id")
    return ChargeRequest(invoice, str(customer_id) if customer_id is not None else None, amount)


def succeeded_payload(request: ChargeRequest, charged: bool) -> dict[str, Any]:
    """Build a PaymentSucceeded payload. An uncharged order reports amount "0.00"."""
    amount = request.amount if charged else Decimal(0)
    return {
        "invoice": request.invoice,
        "customer_id": request.customer_id,
        "amount": format_amount(amount),
        "currency": CURRENCY,
        "charged": charged,
    }


def failed_payload(request: ChargeRequest, reason: str) -> dict[str, Any]:
    """Build a PaymentFailed payload."""
    return {
        "invoice": request.invoice,
        "customer_id": request.customer_id,
        "amount": format_amount(request.amount),
        "reason": reason,
    }


class Billing:
    """Async handler for OrderPlaced that takes payment and publishes the outcome."""

    # Declared for `flowrun validate`, which checks them against the topics' schemas.
    consumes = schemas.OrderPlaced
    produces = {"PaymentSucceeded": schemas.PaymentSucceeded, "PaymentFailed": schemas.PaymentFailed}

    def __init__(self) -> None:
        self._gateway = PaymentGateway(GatewaySettings())
        self._succeeded_topic = "PaymentSucceeded"
        self._failed_topic = "PaymentFailed"
        self._outcomes: Counter[str] = Counter()

    def setup(self, context: Context) -> None:
        """Read the topic and gateway options, or raise InvalidOptionError naming an invalid one."""
        options = context.options
        self._succeeded_topic = str(options.get("succeeded_topic", self._succeeded_topic))
        self._failed_topic = str(options.get("failed_topic", self._failed_topic))
        self._gateway = PaymentGateway(GatewaySettings.from_options(options))

    async def handle(self, message: Message, context: Context) -> None:
        """Charge one order and publish the outcome. A GatewayUnavailable error propagates."""
        try:
            request = charge_request(message.payload)
        except InvalidPayloadError as error:
            # Retrying cannot fix a malformed payload, so send it straight to the dead-letter topic.
            logger.error("rejected message %s: %s", message.id, error)
            message.reject(error)
            return

        if request.amount <= 0:
            await self._publish(
                context, self._succeeded_topic, succeeded_payload(request, charged=False)
            )
            self._outcomes["not charged"] += 1
            return

        decision = await self._gateway.charge(
            request.invoice,
            request.customer_id,
            request.amount,
            message.delivery_count,
            context.clock,
        )
        if decision is ChargeDecision.APPROVED:
            await self._publish(
                context, self._succeeded_topic, succeeded_payload(request, charged=True)
            )
        else:
            await self._publish(
                context, self._failed_topic, failed_payload(request, reason="declined")
            )
        self._outcomes[decision.value] += 1

    def close(self) -> None:
        """Log the count of each payment outcome."""
        summary = ", ".join(
            f"{outcome} {count}" for outcome, count in sorted(self._outcomes.items())
        )
        logger.info("billing outcomes: %s", summary or "none")

    async def _publish(self, context: Context, topic: str, payload: dict[str, Any]) -> None:
        invoice = payload["invoice"]
        await context.publish(topic, payload, key=invoice, id=f"payment-{invoice}")
