"""scripts/livekit_sip_dispatch.py against a stand-in for LiveKit's SIP API.

No LiveKit server can run here, so a local aiohttp app plays the server's Twirp endpoint
(``POST /twirp/livekit.SIP/<Method>``, protobuf in and out). The script and livekit-api are real;
the test reads back exactly what reached the "server".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from aiohttp import web
from livekit import api

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "livekit_sip_dispatch.py"
KEY, SECRET = "devkey", "a-secret-of-at-least-thirty-two-characters"


def load_script():
    spec = importlib.util.spec_from_file_location("livekit_sip_dispatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def fake_sip_api(monkeypatch):
    """The stand-in server; yields (url, received requests as (method, parsed request, JWT claims))."""
    received: list = []
    requests = {
        "CreateSIPInboundTrunk": api.CreateSIPInboundTrunkRequest,
        "CreateSIPDispatchRule": api.CreateSIPDispatchRuleRequest,
    }

    async def handle(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        parsed = requests[method].FromString(await request.read())
        token = request.headers["Authorization"].removeprefix("Bearer ")
        received.append((method, parsed, api.TokenVerifier(KEY, SECRET).verify(token)))
        if method == "CreateSIPInboundTrunk":
            answer = parsed.trunk
            answer.sip_trunk_id = "ST_new"
        else:
            answer = parsed.dispatch_rule
            answer.sip_dispatch_rule_id = "SDR_new"
        return web.Response(body=answer.SerializeToString(), content_type="application/protobuf")

    app = web.Application()
    app.router.add_post("/twirp/livekit.SIP/{method}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("LIVEKIT_API_KEY", KEY)
    monkeypatch.setenv("LIVEKIT_API_SECRET", SECRET)
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


async def test_a_new_trunk_and_a_rule_that_sends_each_caller_to_the_named_agent(fake_sip_api, capsys):
    url, received = fake_sip_api
    script = load_script()
    args = script.parse_args(["--agent-name", "hertz", "--number", "+15550100", "--trunk-id", "ST_old", "--url", url])
    assert await script.run(args) == 0

    assert [method for method, _, _ in received] == ["CreateSIPInboundTrunk", "CreateSIPDispatchRule"]
    _, trunk_request, claims = received[0]
    assert list(trunk_request.trunk.numbers) == ["+15550100"]
    assert claims.sip.admin  # signed with the project's key, with SIP admin rights
    _, rule_request, _ = received[1]
    rule = rule_request.dispatch_rule
    assert list(rule.trunk_ids) == ["ST_old", "ST_new"]  # the existing trunk and the one just made
    assert rule.rule.WhichOneof("rule") == "dispatch_rule_individual"  # a room per caller
    assert rule.rule.dispatch_rule_individual.room_prefix == "call-"
    assert [a.agent_name for a in rule.room_config.agents] == ["hertz"]
    assert "SDR_new" in capsys.readouterr().out


async def test_dry_run_prints_the_requests_and_sends_nothing(fake_sip_api, capsys):
    url, received = fake_sip_api
    script = load_script()
    assert await script.run(script.parse_args(["--agent-name", "hertz", "--number", "+15550100", "--dry-run"])) == 0
    assert received == []
    out = capsys.readouterr().out
    assert '"agentName": "hertz"' in out and '"+15550100"' in out
