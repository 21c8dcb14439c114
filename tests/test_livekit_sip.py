"""scripts/livekit_sip_dispatch.py against a real LiveKit server's SIP API.

``scripts/livekit_dev_stack start`` runs the server with Redis, which is where LiveKit keeps
SIP trunks and dispatch rules; the script creates them over the server's Twirp API and the test
reads them back with livekit-api.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest
from livekit import api
from livekit_room_support import livekit_server, room_name  # noqa: F401 - a fixture

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "livekit_sip_dispatch.py"


def load_script():
    spec = importlib.util.spec_from_file_location("livekit_sip_dispatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.livekit_server
async def test_a_new_trunk_and_a_rule_that_sends_each_caller_to_the_named_agent(
    livekit_server,  # noqa: F811 - the fixture
    monkeypatch,
    capsys,  # noqa: F811
):
    for name, value in livekit_server.env().items():
        monkeypatch.setenv(name, value)
    agent = room_name("hertz")
    number = f"+1555{uuid.uuid4().int % 10**7:07d}"
    script = load_script()
    async with livekit_server.api() as lkapi:
        old = await lkapi.sip.create_inbound_trunk(
            api.CreateSIPInboundTrunkRequest(
                trunk=api.SIPInboundTrunkInfo(name="old", numbers=[number + "9"])
            )
        )
        try:
            args = script.parse_args(
                ["--agent-name", agent, "--number", number, "--trunk-id", old.sip_trunk_id]
            )
            assert await script.run(args) == 0
            out = capsys.readouterr().out

            trunks = (await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())).items
            new = [t for t in trunks if list(t.numbers) == [number]]
            assert len(new) == 1 and new[0].sip_trunk_id in out
            rules = (await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())).items
            rule = next(r for r in rules if [a.agent_name for a in r.room_config.agents] == [agent])
            assert list(rule.trunk_ids) == [old.sip_trunk_id, new[0].sip_trunk_id]
            assert rule.rule.WhichOneof("rule") == "dispatch_rule_individual"  # a room per caller
            assert rule.rule.dispatch_rule_individual.room_prefix == "call-"
            assert rule.sip_dispatch_rule_id in out
        finally:
            for r in (await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())).items:
                if agent in [a.agent_name for a in r.room_config.agents]:
                    await lkapi.sip.delete_dispatch_rule(
                        api.DeleteSIPDispatchRuleRequest(
                            sip_dispatch_rule_id=r.sip_dispatch_rule_id
                        )
                    )
            for t in (await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())).items:
                if t.numbers and t.numbers[0].startswith(number):
                    await lkapi.sip.delete_trunk(
                        api.DeleteSIPTrunkRequest(sip_trunk_id=t.sip_trunk_id)
                    )


async def test_dry_run_prints_the_requests_and_sends_nothing(capsys, monkeypatch):
    monkeypatch.setenv("LIVEKIT_URL", "http://127.0.0.1:9")  # nothing listens there
    script = load_script()
    args = script.parse_args(["--agent-name", "hertz", "--number", "+15550100", "--dry-run"])
    assert await script.run(args) == 0
    out = capsys.readouterr().out
    assert '"agentName": "hertz"' in out and '"+15550100"' in out
