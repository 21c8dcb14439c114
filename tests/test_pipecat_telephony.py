"""Call tokens and Twilio's request signature (pipecat_hertz.telephony), without a network."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)

from pipecat_hertz.telephony import (  # noqa: E402
    CallTokens,
    stream_xml,
    twilio_signature_valid,
)


def test_a_call_token_is_good_once_for_its_call_only():
    tokens = CallTokens()
    token = tokens.mint("CA1")
    assert not tokens.consume(token, "CA2"), "another call's token"
    assert tokens.consume(token, "CA1")
    assert not tokens.consume(token, "CA1"), "a token is single-use"
    unbound = tokens.mint()
    assert tokens.consume(unbound, "anything")


def test_forged_expired_and_foreign_tokens_are_refused():
    tokens = CallTokens()
    token = tokens.mint("CA1")
    body, signature = token.rsplit(".", 1)
    forged = f"{body}.{'0' * len(signature)}"
    assert not tokens.consume(forged, "CA1")
    assert not tokens.consume(CallTokens().mint("CA1"), "CA1"), "minted by another process"
    assert not CallTokens(ttl_s=-1).consume(None)
    expired = CallTokens(secret=b"k" * 32, ttl_s=-10)
    assert not expired.consume(expired.mint("CA1"), "CA1")
    for junk in ("", "abc", "a.b.c", "x.y.z.w"):
        assert not tokens.consume(junk, "CA1")


def test_twilio_signature_as_twilio_documents_it():
    url, params = (
        "https://bot.example.com/",
        {"CallSid": "CA1", "From": "+15550000001", "To": "+1555"},
    )
    data = url + "CallSidCA1From+15550000001To+1555"  # the URL, then the sorted POST parameters
    expected = base64.b64encode(hmac.new(b"secret", data.encode(), hashlib.sha1).digest()).decode()
    assert twilio_signature_valid("secret", url, params, expected)
    assert not twilio_signature_valid("other", url, params, expected)
    assert not twilio_signature_valid("secret", url, {**params, "To": "+1666"}, expected)
    assert not twilio_signature_valid("secret", url, params, None)


def test_stream_xml_carries_the_token_where_each_provider_sends_it_back():
    twilio = stream_xml("twilio", "bot.example.com", "T0K")
    assert (
        '<Stream url="wss://bot.example.com/ws"><Parameter name="hertz_token" value="T0K"/>'
        in twilio
    )
    assert 'url="wss://bot.example.com/ws/T0K"' in stream_xml("telnyx", "bot.example.com", "T0K")
    assert ">wss://bot.example.com/ws/T0K</Stream>" in stream_xml("plivo", "bot.example.com", "T0K")
    with pytest.raises(ValueError, match="twilio, telnyx or plivo"):
        stream_xml("exotel", "bot.example.com", "T0K")
