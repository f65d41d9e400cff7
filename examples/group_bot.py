"""A group bot: creates an end-to-end encrypted group with the given users and echoes into it.

    GROUP_BOT_PASSPHRASE=... python examples/group_bot.py SERVER_URL BOT_USER STORE MEMBER [MEMBER ...]

Every group message a member sends comes back from the bot as ``<sender>: <text>``,
and a direct (1:1) message to the bot is relayed into the group.  The first run
registers the bot and creates the group; later runs reopen the store: the same
device, the same group and sender keys.
"""

import os
import secrets
import sys

import trio

from clientsdk.client import Client
from clientsdk.connection import websocket_connector
from clientsdk.events import MessageReceived
from clientsdk.groups import GroupMessageReceived

SERVER, USER, STORE, *MEMBERS = sys.argv[1:]
PASSPHRASE = os.environ["GROUP_BOT_PASSPHRASE"]


async def main() -> None:
    connect = websocket_connector(SERVER)
    if os.path.exists(STORE):
        bot = await Client.open(STORE, passphrase=PASSPHRASE, connect=connect)
    else:
        bot = await Client.register(STORE, USER, secrets.token_urlsafe(24), connect=connect, passphrase=PASSPHRASE)
    async with bot, bot.connect():
        known = await bot.groups()
        group = known[0] if known else await bot.create_group("echo group", MEMBERS)
        print(f"group bot {bot.address} ready {group}", flush=True)
        async for event in bot.events():
            if isinstance(event, GroupMessageReceived) and not event.outgoing:
                await bot.send_group(event.group_id, f"{event.sender}: {event.text}")
            elif isinstance(event, MessageReceived) and not event.outgoing:
                await bot.send_group(group, f"{event.sender} (direct): {event.text}")


if __name__ == "__main__":
    trio.run(main)
