"""The wire protocol, tokens and metrics text, without a server: what is accepted, what is
refused and why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hertz_agents.remote import protocol as p
from hertz_agents.remote.client import ServerAddress
from hertz_agents.sampling import SamplingSettings
from hertz_agents.server.auth import TokenAuth, is_loopback
from hertz_agents.server.compat import parse_temperatures
from hertz_agents.server.prometheus import Histogram, ServerMetrics
from hertz_agents.timing import SAMPLES_PER_STEP

LIMITS = p.Limits()


def test_output_frames_round_trip_with_their_header():
    audio = np.linspace(-1, 1, SAMPLES_PER_STEP, dtype=np.float32)
    for seq in (0, 7, None):
        data = p.encode_output(12, seq, 31.5, 4.25, audio)
        assert len(data) == p.OUTPUT_FRAME_BYTES
        frame = p.decode_output(data)
        assert (frame.step, frame.input_seq, frame.silence_input) == (12, seq, seq is None)
        assert frame.compute_ms == pytest.approx(31.5) and frame.queue_ms == pytest.approx(4.25)
        assert np.abs(frame.audio - audio).max() <= 1 / 32768
    with pytest.raises(p.ProtocolError):
        p.decode_output(data[:-2])


def test_pcm16_conversion_clips_instead_of_wrapping():
    loud = np.array([2.0, -2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    back = p.pcm16_to_float(p.float_to_pcm16(loud))
    assert back[0] > 0.99 and back[1] == -1.0 and back[2] > 0.99 and back[4] == 0.5


def test_a_start_message_round_trips_with_settings_prompt_and_seed():
    start = p.Start(
        sampling=SamplingSettings(token_temp=0.6, top_p=0.9), prompt=p.Prompt(name="bob"), seed=5
    )
    parsed = p.parse_client_message(p.encode(start), LIMITS)
    assert parsed == start
    inline = p.Start(prompt=p.Prompt(audio=b"RIFF....WAVE"))
    assert p.parse_client_message(p.encode(inline), LIMITS).prompt.audio == b"RIFF....WAVE"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", p.ErrorCode.BAD_REQUEST),
        ("[1, 2]", p.ErrorCode.BAD_REQUEST),
        ('{"kind": "start"}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "launch"}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 99}', p.ErrorCode.UNSUPPORTED_VERSION),
        ('{"type": "start", "version": 1, "extra": 1}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 1, "seed": -1}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 1, "seed": true}', p.ErrorCode.BAD_REQUEST),
        (
            '{"type": "start", "version": 1, "sampling": {"token_temp": -1}}',
            p.ErrorCode.BAD_REQUEST,
        ),
        (
            '{"type": "start", "version": 1, "sampling": {"token_temp": NaN}}',
            p.ErrorCode.BAD_REQUEST,
        ),
        (
            '{"type": "start", "version": 1, "sampling": {"token_temp": "hot"}}',
            p.ErrorCode.BAD_REQUEST,
        ),
        ('{"type": "start", "version": 1, "sampling": {"top_k": 5}}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 1, "sampling": {"top_p": 0}}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 1, "prompt": "bob"}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "start", "version": 1, "prompt": {"name": ""}}', p.ErrorCode.BAD_REQUEST),
        (
            '{"type": "start", "version": 1, "prompt": {"audio_base64": "@@@"}}',
            p.ErrorCode.BAD_PROMPT,
        ),
        ('{"type": "start", "version": 1, "prompt": {"audio_base64": ""}}', p.ErrorCode.BAD_PROMPT),
        ('{"type": "settings"}', p.ErrorCode.BAD_REQUEST),
        ('{"type": "settings", "sampling": {"min_p": 1.5}}', None),  # parsed; refused when applied
    ],
)
def test_malformed_client_messages_are_refused_with_the_right_code(text, code):
    if code is None:
        message = p.parse_client_message(text, LIMITS)
        with pytest.raises(p.ProtocolError):
            p.apply_sampling(SamplingSettings(), message.sampling)
        return
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_message(text, LIMITS)
    assert info.value.code == code and str(info.value)


def test_an_oversized_inline_prompt_is_refused_before_decoding():
    small = p.Limits(max_prompt_bytes=30)
    text = json.dumps({"type": "start", "version": 1, "prompt": {"audio_base64": "A" * 400}})
    with pytest.raises(p.ProtocolError, match="at most 30 bytes"):
        p.parse_client_message(text, small)


def test_input_frames_must_be_whole_samples_within_the_limit():
    p.check_input_frame(b"\0" * 2, LIMITS)
    p.check_input_frame(b"\0" * LIMITS.max_frame_bytes, LIMITS)
    for bad in (b"", b"\0" * 3, b"\0" * (LIMITS.max_frame_bytes + 2)):
        with pytest.raises(p.ProtocolError) as info:
            p.check_input_frame(bad, LIMITS)
        assert info.value.code == p.ErrorCode.BAD_AUDIO


def test_server_messages_parse_and_ignore_fields_a_newer_server_adds():
    ended = p.parse_server_message('{"type": "ended", "reason": "client", "steps": 3, "future": 1}')
    assert ended == p.Ended("client", 3)
    with pytest.raises(p.ProtocolError):
        p.parse_server_message('{"type": "surprise"}')


def test_error_codes_map_to_websocket_close_codes():
    assert p.ErrorCode.SERVER_FULL.close_code == 1013 and p.ErrorCode.SERVER_FULL.retry_elsewhere
    assert p.ErrorCode.BAD_AUDIO.close_code == 1007 and not p.ErrorCode.BAD_AUDIO.retry_elsewhere
    assert p.ErrorCode.INTERNAL.close_code == 1011


def test_tokens_match_exactly_and_come_from_header_query_or_path():
    auth = TokenAuth("s3cret-token-abcdefgh")
    assert auth.check("s3cret-token-abcdefgh")
    for wrong in (
        None,
        "",
        "s3cret-token-abcdefg",
        "s3cret-token-abcdefghi",
        "S3CRET-TOKEN-ABCDEFGH",
    ):
        assert not auth.check(wrong)
    assert auth.check_request({"Authorization": "Bearer s3cret-token-abcdefgh"}, {})
    assert auth.check_request(
        {"Authorization": "bearer s3cret-token-abcdefgh"}, {}
    )  # the scheme is case-blind
    assert auth.check_request({}, {"token": "s3cret-token-abcdefgh"})
    assert auth.check_request({}, {}, path_token="s3cret-token-abcdefgh")
    assert not auth.check_request({"Authorization": "Basic s3cret-token-abcdefgh"}, {})
    assert TokenAuth(None).check(None) and not TokenAuth(None).required
    with pytest.raises(ValueError, match="at least 16"):
        TokenAuth("short")


def test_only_loopback_hosts_may_run_without_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.5", "gpu-1.internal", ""):
        assert not is_loopback(host)


def test_remote_urls_parse_with_token_tls_and_default_port(monkeypatch):
    monkeypatch.delenv("HERTZ_TOKEN", raising=False)
    address, query = ServerAddress.parse("hertz://gpu-1:9000?token=abc&reconnect=2")
    assert (address.host, address.port, address.tls, address.token) == ("gpu-1", 9000, False, "abc")
    assert (
        query["reconnect"] == "2"
        and address.url("/v1/session", websocket=True) == "ws://gpu-1:9000/v1/session"
    )
    assert address.headers == {"Authorization": "Bearer abc"} and "abc" not in str(address)
    secure, _ = ServerAddress.parse("hertz://gpu-1?tls=1")
    assert secure.port == 443 and secure.url("/v1/info") == "https://gpu-1:443/v1/info"
    monkeypatch.setenv("HERTZ_TOKEN", "from-env")
    assert ServerAddress.parse("hertz://[::1]:8000")[0].url("/x") == "http://[::1]:8000/x"
    assert ServerAddress.parse("hertz://h:1")[0].token == "from-env"
    with pytest.raises(ValueError):
        ServerAddress.parse("ws://gpu-1:9000")


def test_compat_temperatures_are_validated():
    assert parse_temperatures({"token_temp": "0.7", "other": "x"}) == {"token_temp": 0.7}
    with pytest.raises(ValueError, match="must be a number"):
        parse_temperatures({"token_temp": "warm"})
    with pytest.raises(ValueError):
        parse_temperatures({"gaussian_temp": "-1"})


def test_prometheus_text_has_cumulative_buckets_and_labelled_counters():
    h = Histogram((0.1, 0.2))
    for v in (0.05, 0.15, 0.15, 5.0):
        h.observe(v)
    assert h.lines("x") == [
        'x_bucket{le="0.1"} 1',
        'x_bucket{le="0.2"} 3',
        'x_bucket{le="+Inf"} 4',
        "x_sum 5.350000",
        "x_count 4",
    ]
    m = ServerMetrics()
    m.observe_step(40.0, 200.0, silence=False)
    m.ended["bad_audio"] += 1
    text = m.render(
        active={"session": 2, "compat": 0}, max_sessions=8, draining=False, engine=object()
    )
    assert 'hertz_sessions_active{endpoint="session"} 2' in text
    assert 'hertz_sessions_ended_total{reason="bad_audio"} 1' in text
    assert "hertz_late_steps_total 1" in text and "hertz_real_time_factor 0.32" in text
    assert text.endswith("\n") and all(
        line.startswith(("#", "hertz_")) for line in text.splitlines()
    )
