"""Send every phone call on a LiveKit SIP inbound trunk to the hertz-dev agent.

Each caller gets a room of their own, and LiveKit dispatches the named agent into it (run the
worker with ``--agent-name`` set to the same name). Uses LIVEKIT_URL, LIVEKIT_API_KEY and
LIVEKIT_API_SECRET, like the worker.

    # an inbound trunk you already have (see `lk sip inbound list`)
    python scripts/livekit_sip_dispatch.py --agent-name hertz --trunk-id ST_xxxxxxxx
    # or create the inbound trunk for your number first, then the rule
    python scripts/livekit_sip_dispatch.py --agent-name hertz --number +15550100
    # print the requests instead of sending them
    python scripts/livekit_sip_dispatch.py --agent-name hertz --number +15550100 --dry-run

docs/livekit.md ("Phone calls") explains the rest: the provider's side, and what the 8 kHz
narrowband telephone path does to a model trained on 16 kHz audio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from google.protobuf.json_format import MessageToJson
from livekit import api


def inbound_trunk_request(args: argparse.Namespace) -> api.CreateSIPInboundTrunkRequest:
    """An inbound trunk for calls to ``args.number`` (optionally only from listed callers)."""
    return api.CreateSIPInboundTrunkRequest(
        trunk=api.SIPInboundTrunkInfo(
            name=f"{args.name} trunk",
            numbers=args.number,
            allowed_numbers=args.allowed_caller or [],
        )
    )


def dispatch_rule_request(
    args: argparse.Namespace, trunk_ids: list[str]
) -> api.CreateSIPDispatchRuleRequest:
    """One room per caller (``<prefix><caller>_<random>``), the named agent dispatched into it."""
    return api.CreateSIPDispatchRuleRequest(
        dispatch_rule=api.SIPDispatchRuleInfo(
            name=args.name,
            trunk_ids=trunk_ids,  # empty: every inbound trunk of the project
            rule=api.SIPDispatchRule(
                dispatch_rule_individual=api.SIPDispatchRuleIndividual(room_prefix=args.room_prefix)
            ),
            room_config=api.RoomConfiguration(
                agents=[api.RoomAgentDispatch(agent_name=args.agent_name)]
            ),
        )
    )


async def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        trunk_ids = list(args.trunk_id)
        if args.number:
            print(MessageToJson(inbound_trunk_request(args)))
            trunk_ids.append("<the new trunk's id>")
        print(MessageToJson(dispatch_rule_request(args, trunk_ids)))
        return 0

    async with api.LiveKitAPI(url=args.url) as lkapi:
        trunk_ids = list(args.trunk_id)
        if args.number:
            trunk = await lkapi.sip.create_inbound_trunk(inbound_trunk_request(args))
            print(f"created inbound trunk {trunk.sip_trunk_id} for {', '.join(trunk.numbers)}")
            trunk_ids.append(trunk.sip_trunk_id)
        rule = await lkapi.sip.create_dispatch_rule(dispatch_rule_request(args, trunk_ids))
    print(
        f"created dispatch rule {rule.sip_dispatch_rule_id}: calls on "
        f"{', '.join(rule.trunk_ids) or 'every inbound trunk'} go to agent {args.agent_name!r} "
        f"in rooms named {args.room_prefix}<caller>_<random>"
    )
    print(
        f"now run the worker: python examples/livekit_agent.py --agent-name {args.agent_name} start"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agent-name", required=True, help="the worker's --agent-name / HERTZ_AGENT_NAME"
    )
    parser.add_argument(
        "--trunk-id", action="append", default=[], help="an existing inbound trunk (repeatable)"
    )
    parser.add_argument(
        "--number", action="append", default=[], help="create an inbound trunk for this number"
    )
    parser.add_argument(
        "--allowed-caller", action="append", help="with --number: accept only these callers"
    )
    parser.add_argument(
        "--room-prefix", default="call-", help="rooms are named <prefix><caller>_<random>"
    )
    parser.add_argument("--name", default="hertz-dev inbound", help="name of the rule (and trunk)")
    parser.add_argument("--url", help="LiveKit server URL (default: $LIVEKIT_URL)")
    parser.add_argument("--dry-run", action="store_true", help="print the requests, send nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
