import trio, logging
from clientsdk.events import MessageReceived, ReceiptReceived
from tests.sdk.conftest import DOMAIN
from tests.sdk.test_receipts import next_of, BOB

async def test_dbg(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    orig = bob._send_content
    def traced(recipients, template, **kw):
        print("bob send start", template.type, template.state, trio.current_time())
        async def run():
            try:
                await orig(recipients, template, **kw)
                print("bob send done", template.type, template.state, trio.current_time())
            except BaseException as e:
                print("bob send aborted", template.type, template.state, type(e).__name__)
                raise
        return run()
    bob._send_content = traced
    async with alice.connect():
        message_id = await alice.send(BOB, "while you were away")
    async with bob.connect():
        await next_of(bob, MessageReceived)
        print("bob got message; receipts_due", dict(bob._receipts_due))
        with trio.fail_after(10):
            while bob._receipts_due:
                await trio.sleep(0.01)
        print("waited; receipts_due", dict(bob._receipts_due))
        await bob.mark_read(message_id)
        print("marked read")
    print("receipts_due after disconnect", dict(bob._receipts_due))
    async with alice.connect():
        kinds = [(await next_of(alice, ReceiptReceived, 3)).kind for _ in range(2)]
        assert kinds == ["delivered", "read"]
    await alice.aclose()
    await bob.aclose()
