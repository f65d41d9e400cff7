"""An echo bot: answers every message with the same text.

    ECHO_BOT_PASSPHRASE=... python examples/echo_bot.py [SERVER_URL [USER [STORE]]]

Defaults come from $ECHO_BOT_SERVER, $ECHO_BOT_USER and $ECHO_BOT_STORE.  The
first run registers the bot (its password is random: the bot never logs in
again, it authenticates with its device key); later runs reopen the store, so it
is the same device with the same sessions.
"""

import os
import secrets
import sys

import trio

from clientsdk.client import Client
from clientsdk.connection import websocket_connector

args = sys.argv[1:] + [None] * 3
SERVER = args[0] or os.environ.get("ECHO_BOT_SERVER", "ws://127.0.0.1:8448/c2s")
USER = args[1] or os.environ.get("ECHO_BOT_USER", "echo@localhost")
STORE = args[2] or os.environ.get("ECHO_BOT_STORE", "echo_bot.db")
PASSPHRASE = os.environ["ECHO_BOT_PASSPHRASE"]


async def main() -> None:
    connect = websocket_connector(SERVER)
    if os.path.exists(STORE):
        bot = await Client.open(STORE, passphrase=PASSPHRASE, connect=connect)
    else:
        bot = await Client.register(STORE, USER, secrets.token_urlsafe(24), connect=connect, passphrase=PASSPHRASE)

    @bot.on_message
    async def echo(message):
        await bot.send(message.sender, message.text)

    print(f"echo bot {bot.address} ready", flush=True)
    await bot.run()


if __name__ == "__main__":
    trio.run(main)
