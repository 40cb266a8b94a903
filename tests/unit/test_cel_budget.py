"""CEL conditions have a cost bound: nested comprehensions refused at compile time, inputs
over the bound not evaluated, evaluations over the time budget denied, each with a reason."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import check_request, policy_set, write_bundle

from authz.bundle.loader import BundleError
from authz.engine import cel
from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet
from authz.request import from_check_request


def decide(ps: PolicySet, **kw: Any):  # noqa: ANN201
    return ps.decide(from_check_request(check_request(**kw), ps.trust_domains))


def allow_when(when: str) -> list[dict[str, Any]]:
    return [{"name": "p", "action": "ALLOW", "rules": [{"name": "r", "when": [when]}]}]


def test_three_nested_comprehensions_are_refused_at_load_with_file_line(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", allow_when(
        "request.headers.all(a, request.headers.exists(b, request.headers.exists(c, a + b == c)))"))
    with pytest.raises(BundleError) as err:
        load_policy_set(root)
    text = str(err.value)
    assert "policies/p.yaml:" in text and "condition too expensive: 3 comprehensions nested" in text
    # two levels are fine
    ps = policy_set(tmp_path, allow_when("request.headers.all(a, request.headers.exists(b, a == b))"))
    assert decide(ps, headers={"x-a": "1"}).allowed


@pytest.mark.parametrize("text", ["'x.all(y, y.exists(z, z.map(w, w)))'", '"(.all(.exists(.map("'])
def test_macro_names_inside_strings_do_not_count(text: str) -> None:
    assert cel._comprehension_depth(f"request.path == {text}")[0] == 0


def test_oversized_inputs_are_not_evaluated_and_deny_with_a_reason(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, allow_when("request.path.startsWith('/v1')"))
    assert decide(ps, path="/v1/" + "a" * 100).allowed
    d = decide(ps, path="/v1/" + "a" * (cel.MAX_INPUT_CHARS + 1))
    assert not d.allowed and d.reason == "condition over budget" and d.condition_error
    ps = policy_set(tmp_path / "h", allow_when("request.headers.exists(k, k == 'x-a')"))
    assert decide(ps, headers={"x-a": "1"}).allowed
    d = decide(ps, headers={"x-a": "1", "x-big": "v" * (cel.MAX_MAP_INPUT_CHARS + 1)})
    assert not d.allowed and d.reason == "condition over budget"
    # a condition that does not read the large field is unaffected by it
    ps = policy_set(tmp_path / "m", allow_when("request.method == 'GET'"))
    assert decide(ps, path="/" + "a" * (cel.MAX_INPUT_CHARS * 2)).allowed


def test_a_comprehension_over_the_iteration_budget_is_denied(tmp_path: Path) -> None:
    # Written so that the load-time check of data comprehensions cannot see the collection
    # (`data.big.items.exists(...)` itself is a load error): the runtime bound still holds.
    ps = policy_set(tmp_path, allow_when("dyn(data.big).items.exists(x, x == request.method)"),
                    data={"big": {"items": [f"v{i}" for i in range(20_000)]}})
    d = decide(ps, method="GET")
    assert not d.allowed and d.reason == "condition over budget" and d.condition_error
    small = policy_set(tmp_path / "s", allow_when("data.big.items.exists(x, x == request.method)"),
                       data={"big": {"items": [f"v{i}" for i in range(100)] + ["GET"]}})
    assert decide(small, method="GET").allowed


def test_an_evaluation_over_the_time_budget_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ps = policy_set(tmp_path, allow_when("request.method == 'GET'"))
    assert decide(ps, method="GET").allowed
    monkeypatch.setattr(cel, "EVAL_BUDGET_SECONDS", 0.0)  # every evaluation takes more than 0 s
    d = decide(ps, method="GET")
    assert not d.allowed and d.reason == "condition over budget" and d.condition_error


@pytest.mark.parametrize("when", [
    "request.headers.exists(k, request.headers.exists(j, (request.path + k + j).size() < 0))",
    "[data.big][0].map(x, request.path + x).size() < 0",
    "request.headers.exists(k, k + request.path == 'x')",
])
def test_copying_a_request_input_in_a_comprehension_over_an_unsized_range_is_refused(tmp_path: Path, when: str) -> None:
    """Each iteration copied the request input (up to 64 KiB) and the runtime kept every copy
    until the evaluation ended: one check held 1.3 to 1.9 GB and the interpreter for seconds."""
    root = write_bundle(tmp_path / "b", allow_when(when), data={"big": [f"v{i}" for i in range(5000)]})
    with pytest.raises(BundleError, match="copies a request input at every iteration"):
        load_policy_set(root)


def test_copying_a_request_input_over_bundle_data_is_bounded_by_its_size(tmp_path: Path) -> None:
    """`data.prefixes.exists(p, (request.path + '/').startsWith(p + '/'))` over 9,000
    prefixes and a 64 KB path held 645 MB: such a comprehension may run over as many items as
    a map may build; comparing without the copy may run over all it can scan."""
    when = "data.prefixes.exists(p, (request.path + '/').startsWith(p + '/'))"
    many = {"prefixes": [f"/svc{i}" for i in range(9000)]}
    with pytest.raises(BundleError, match="at most 256 when it copies a request input"):
        load_policy_set(write_bundle(tmp_path / "b", allow_when(when), data=many))
    ps = policy_set(tmp_path / "few", allow_when(when), data={"prefixes": [f"/svc{i}" for i in range(200)]})
    assert decide(ps, path="/svc7/x").allowed and not decide(ps, path="/svc7x").allowed
    fine = "data.prefixes.exists(p, request.path.startsWith(p + '/'))"  # p + '/' copies no request input
    ps = policy_set(tmp_path / "fine", allow_when(fine), data=many)
    assert decide(ps, path="/svc8999/x").allowed


@pytest.mark.parametrize("when", [
    "[request.path].exists(p, data.items.exists(x, (p + x).size() == 1))",
    "data.items.exists(x, [request.path].exists(p, (p+x).size()==1))",
    "data.items.exists(x, ((request.path) + x).size() == 1)",
    "data.items.exists(x, (string(request.path) + x).size() == 1)",
    "data.items.exists(x, (x + string(request.path)).size() == 1)",
    "[request.path].exists(p, data.items.exists(x, ((p) + x).size() == 1))",
])
def test_a_request_input_bound_to_a_comprehension_variable_counts_as_one(tmp_path: Path, when: str) -> None:
    """`[request.path].exists(p, ... p + x ...)` copied the path at every iteration of the
    inner comprehension: 575 MB for one check with 10,000 items and a 60 KB path."""
    root = write_bundle(tmp_path / "b", allow_when(when), data={"items": [f"v{i}" for i in range(10_000)]})
    with pytest.raises(BundleError, match="copies a request input|at most 256 when it copies"):
        load_policy_set(root)


@pytest.mark.parametrize("when", [
    "request.headers.all(k, size(request.headers[k]) + 1 < 8192)",
    "request.headers.exists(k, int(request.headers[k]) + 1 > 5)",
])
def test_adding_numbers_in_a_comprehension_is_no_copy(tmp_path: Path, when: str) -> None:
    load_policy_set(write_bundle(tmp_path / "b", allow_when(when)))
