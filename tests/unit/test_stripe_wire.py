"""Stripe's form encoding as the Stripe-compatible surface decodes it (api/stripe/wire.py): bracket
notation, indexed and appended lists, limits, and refusals that name the parameter."""

from __future__ import annotations

import pytest
from gateway.api.stripe import wire
from gateway.api.stripe.wire import ParamError, parse_form


def test_bracket_notation_nests_and_lists() -> None:
    got = parse_form("amount=100&metadata[order_id]=42&metadata[note]=a+b&expand[0]=latest_charge"
                     "&expand[1]=customer&types[]=x&types[]=y&created[gte]=5")
    assert got == {"amount": "100", "metadata": {"order_id": "42", "note": "a b"},
                   "expand": ["latest_charge", "customer"], "types": ["x", "y"], "created": {"gte": "5"}}


def test_indexed_lists_keep_index_order_and_top_level_digits_stay_names() -> None:
    assert parse_form("e[1]=b&e[0]=a&e[10]=c") == {"e": ["a", "b", "c"]}
    assert parse_form("0=null") == {"0": "null"}


@pytest.mark.parametrize(("text", "code"), [
    ("a=1&a=2", "parameter_duplicate"),
    ("a[b]=1&a=2", "parameter_duplicate"),
    ("a=1&a[b]=2", "parameter_invalid"),
    ("a[b][c][d][e][f][g]=1", "parameter_invalid"),
    ("[x]=1", "parameter_invalid"),
    ("&".join(f"k{i}=v" for i in range(wire.FORM_PARAMS_MAX + 1)), "parameter_invalid"),
    ("&".join(f"l[]={i}" for i in range(wire.LIST_ITEMS_MAX + 1)), "parameter_invalid"),
])
def test_malformed_forms_are_refused_with_a_code(text: str, code: str) -> None:
    with pytest.raises(ParamError) as e:
        parse_form(text)
    assert e.value.code == code


def test_values_are_checked_and_name_their_param() -> None:
    params = {"amount": "12x", "capture": "yes", "currency": "usd", "extra": "1"}
    with pytest.raises(ParamError) as e:
        wire.take_int(params, "amount", 1, 100)
    assert (e.value.code, e.value.param) == ("parameter_invalid_integer", "amount")
    with pytest.raises(ParamError) as e:
        wire.take_bool(params, "capture")
    assert e.value.param == "capture"
    assert wire.take_str(params, "currency", 3) == "usd"
    with pytest.raises(ParamError) as e:
        wire.no_more(params)
    assert (e.value.code, e.value.param) == ("parameter_unknown", "extra")
