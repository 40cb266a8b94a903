"""CEL error messages echo values (map keys, bad patterns) that can be secrets: what is logged or
explained of them goes through ``redact.echo_free``, which keeps the kind and the message only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from bundle_factory import check_request, policy_set, spiffe

from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.engine.cel import CelEvalError, compile_condition, evaluate
from authz.redact import MAX_ERROR_TEXT, echo_free


def error_of(expression: str, headers: dict[str, str]) -> CelEvalError:
    with pytest.raises(CelEvalError) as info:
        evaluate(compile_condition(expression), {"data": {"keys": {"k-1": "acme", 7: "seven"}},
                                                 "request.headers": headers})
    return info.value


@pytest.mark.parametrize("secret", ["SECRET", 'SEC"RET', "SEC'RET", 'S\'E"C\\RET', "SECRET\n\u00e9"])
def test_a_map_key_from_the_request_is_not_echoed(secret: str) -> None:
    exc = error_of("data.keys[request.headers['x-api-key']] == 'acme'", {"x-api-key": secret})
    assert "RET" in str(exc)  # the runtime does echo it
    assert echo_free(exc) == 'NOT_FOUND: Key not found in map : "…"'


def test_unquoted_echoes_are_cut() -> None:
    exc = error_of("data.keys[int(request.headers['x-pin'])] == 'seven'", {"x-pin": "1234"})
    assert echo_free(exc) == 'NOT_FOUND: Key not found in map : "…"'
    exc = error_of("'a'.matches(request.headers['x-re'])", {"x-re": "(SECRET"})
    assert "SECRET" in str(exc)
    assert echo_free(exc) == 'INVALID_ARGUMENT: invalid regular expression: missing ): "…"'


@pytest.mark.parametrize(("text", "shown"), [
    ('no such overload: "a" + \'b\'', 'no such overload: "…" + "…"'),
    (r'kind: "a\"b" and "c"', 'kind: "…" and "…"'),
    ("open: 'SECRET", 'open: "…"'),
    ("open: 'SECRET\\", 'open: "…"'),
    ("INVALID_ARGUMENT: cannot convert string to int", "INVALID_ARGUMENT: cannot convert string to int"),
    ("no value for data", "no value for data"),
])
def test_quoted_literals_are_replaced(text: str, shown: str) -> None:
    assert echo_free(text) == shown


def test_the_message_is_bounded() -> None:
    shown = echo_free("x" * 10_000)
    assert len(shown) <= MAX_ERROR_TEXT + 1 and shown.endswith("…")


def test_shaping_logs_no_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caller = spiffe("prod", "checkout")
    policies = [{"name": "keyed", "action": "ALLOW", "rules": [{
        "name": "by-key", "from": [{"source": {"principals": [caller]}}],
        "upstreamHeaders": {"x-customer": "string(data.keys[request.headers['x-api-key']])"}}]}]
    store = BundleStore(None)
    store.current = policy_set(tmp_path, policies, data={"keys": {"k-1": "acme"}})
    caplog.set_level(logging.DEBUG, logger="authz")
    out = Checker(store, None).run(check_request(principal=caller, headers={"x-api-key": "SECRET"}))
    assert out.decision.reason == "upstream header error"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "upstream header of keyed/by-key failed" in logged
    assert "SECRET" not in logged
    assert 'Key not found in map : "…"' in logged
