"""The offline client's retry policy: which replies decide a request, and how long to wait.

Pure: no I/O, no clock; randomness is passed in.

A reply is *final* when sending the same request again could not change the answer in a way the
protocol promises, so it is recorded as the request's outcome:
- `ok` (including `duplicate: true`, which is the original reply of a request already applied):
  granted.
- `insufficient` (with `lines`: requested and available per short line), `not_found`,
  `conflict` (the id was used with another payload), `invalid_state`, `invalid`, and the
  request-shape errors `bad_request`, `unknown_op` (the outbox validates before writing, so
  these mean a server that reads the contract differently): refused. A refusal leaves no trace on
  the server, so it is the true outcome of this request at the moment it was applied.
- an error code this client does not know (a newer server): refused, with the server's code and
  message recorded. Retrying it forever would block every later request behind it.

A reply is *transient*, and the request stays queued and is sent again with the same id, for:
- `overloaded`: the server shed it, leaving no trace;
- `internal`: the server's log failed; it acknowledges nothing until restarted, and recovery
  keeps exactly what was durable (a resend is then a duplicate or a first apply);
- `unauthorized`, `unsupported_version`: the connection, not the request, is refused (wrong
  token, server too old or too new); the request waits for an operator to fix that.
`frame_too_large` cannot reach a request: the outbox refuses a request over the frame bound
before writing it (the server's reply to it would carry no id, and it closes the connection).
A lost connection, or no reply within the timeout, is transient too: the request may or may not
have been applied, and the resend with the same id tells which (`duplicate: true`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from . import _errors as errors
from .outbox_store import GRANTED, REFUSED

FINAL_ERROR_CODES = frozenset(
    {
        errors.INSUFFICIENT,
        errors.NOT_FOUND,
        errors.CONFLICT,
        errors.INVALID_STATE,
        errors.INVALID,
        errors.BAD_REQUEST,
        errors.UNKNOWN_OP,
    }
)

TRANSIENT_ERROR_CODES = frozenset(
    {
        errors.OVERLOADED,
        errors.INTERNAL,
        errors.UNAUTHORIZED,
        errors.UNSUPPORTED_VERSION,
        # Never matched to a request (its reply has id nil); listed so that it is not "unknown".
        errors.FRAME_TOO_LARGE,
    }
)

# Doublings of the reconnect delay are capped here so the exponent stays small; the delay itself
# is capped by `delay_max_seconds` long before.
BACKOFF_DOUBLINGS_MAX = 32


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one reply means for its request: final with an outcome, or try again."""

    final: bool
    outcome: str | None  # GRANTED or REFUSED when final
    reason: str


def judge_reply(reply: dict[str, Any]) -> Verdict:
    """Classify the server's reply to a queued request (see the module docstring)."""
    if reply.get("ok") is True:
        duplicate = " (duplicate: already applied, original reply)" if reply.get("duplicate") is True else ""
        return Verdict(True, GRANTED, f"ok{duplicate}")
    code = reply.get("error")
    message = reply.get("message", "")
    if code in TRANSIENT_ERROR_CODES:
        return Verdict(False, None, f"{code}: {message}")
    if code in FINAL_ERROR_CODES:
        return Verdict(True, REFUSED, f"{code}: {message}")
    return Verdict(True, REFUSED, f"unknown error code {code!r}: {message}")


def backoff_delay_seconds(failures: int, delay_min_seconds: float, delay_max_seconds: float, chooser: random.Random) -> float:
    """The wait before the next attempt after `failures` failures in a row (1 or more).

    Exponential from `delay_min_seconds`, capped at `delay_max_seconds`, with "equal jitter": half
    of the step is fixed, half random, so that many clients that lost the server together do not
    come back in step, yet none retries at once.
    """
    assert failures >= 1 and 0 < delay_min_seconds <= delay_max_seconds
    step = min(delay_max_seconds, delay_min_seconds * 2 ** min(failures - 1, BACKOFF_DOUBLINGS_MAX))
    return step / 2 + chooser.uniform(0, step / 2)
