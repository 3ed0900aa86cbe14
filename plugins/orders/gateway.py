"""PaymentGateway: the simulated payment processor, the one stand-in of the orders example.

A real payment processor is an external service. This one waits `latency` seconds per
charge, then fails transiently, declines or approves. The outcome depends only on
`(seed, invoice, attempt)`, so a run can be repeated exactly, and a retried charge (a new
attempt) can succeed where the previous attempt failed.

Options, read from Billing's `with:`:

- `latency`: seconds per charge, or a duration such as `2ms` (default 0.002).
- `failure_rate`: probability of a transient error, raised as GatewayUnavailable (default 0.05).
- `decline_rate`: probability that the card is declined (default 0.02).
- `seed`: integer that selects one repeatable sequence of outcomes (default 7).
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from flowrun.durations import parse_duration
from flowrun_plugins.orders.errors import InvalidOptionError

if TYPE_CHECKING:
    from flowrun.clock import Clock

logger = logging.getLogger(__name__)


class GatewayUnavailable(Exception):
    """A transient gateway error: the same charge may succeed on a later attempt."""


class ChargeDecision(enum.StrEnum):
    """Outcome of one charge attempt."""

    APPROVED = "approved"
    DECLINED = "declined"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Latency in seconds, failure and decline probabilities, and the seed of the outcomes."""

    latency: float = 0.002
    failure_rate: float = 0.05
    decline_rate: float = 0.02
    seed: int = 7

    def __post_init__(self) -> None:
        for name in ("failure_rate", "decline_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidOptionError(
                    f"invalid {name} {value!r}: expected a probability from 0 to 1"
                )

        if self.failure_rate + self.decline_rate > 1.0:
            raise InvalidOptionError(
                f"failure_rate {self.failure_rate} plus decline_rate {self.decline_rate} exceeds 1"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GatewaySettings:
        """Read `latency`, `failure_rate`, `decline_rate` and `seed`.

        Raises InvalidOptionError, or ValueError for a latency that is not a duration.
        """
        defaults = cls()
        seed = options.get("seed", defaults.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidOptionError(f"invalid seed {seed!r}: expected an integer")

        return cls(
            latency=parse_duration(options.get("latency", defaults.latency)),
            failure_rate=_probability(options, "failure_rate", defaults.failure_rate),
            decline_rate=_probability(options, "decline_rate", defaults.decline_rate),
            seed=seed,
        )


class PaymentGateway:
    """Simulated payment processor with repeatable outcomes."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings

    def decide(self, invoice: str, attempt: int) -> ChargeDecision:
        """Return the outcome of charge attempt `attempt` (1 for the first) of `invoice`.

        Each call seeds its own Random, never the global one, so concurrent charges and
        other users of `random` do not change the outcome.
        """
        rng = random.Random(f"payment-gateway:{self.settings.seed}:{invoice}:{attempt}")
        roll = rng.random()
        if roll < self.settings.failure_rate:
            return ChargeDecision.UNAVAILABLE
        if roll < self.settings.failure_rate + self.settings.decline_rate:
            return ChargeDecision.DECLINED
        return ChargeDecision.APPROVED

    async def charge(
        self, invoice: str, customer_id: str | None, amount: Decimal, attempt: int, clock: Clock
    ) -> ChargeDecision:
        """Charge `amount` GBP for `invoice` and return APPROVED or DECLINED.

        A missing `customer_id` is charged as a guest. Raises GatewayUnavailable on a
        simulated transient error.
        """
        await clock.sleep(self.settings.latency)

        decision = self.decide(invoice, attempt)
        account = customer_id or "guest"
        logger.debug("charge of %s GBP for invoice %s (%s): %s", amount, invoice, account, decision)
        if decision is ChargeDecision.UNAVAILABLE:
            raise GatewayUnavailable(
                f"payment gateway unavailable for invoice {invoice} (attempt {attempt}); "
                "simulated transient error, retry later"
            )
        return decision


def _probability(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(f"invalid {name} {value!r}: expected a probability from 0 to 1")
    return float(value)
