"""End-to-end scenarios driven by slixmpp, a third-party XMPP client library (Python).

Run by tests/tests/slixmpp.rs against a real `starling` process:

    python3 scenarios.py SCENARIO --port PORT --ca CERT.pem [--domain localhost]

Every client connects over STARTTLS (direct TLS off), verifies the server's certificate
against CERT.pem, and authenticates with SCRAM. slixmpp puts `xml:lang` on every stanza
(ClientXMPP's `lang='en'`), which is part of what is tested. Exit status 0 means every
assertion held; a failure prints what was expected and what came.
"""

import argparse
import asyncio
import logging
import ssl
import sys

import slixmpp

TIMEOUT = 20


class Client(slixmpp.ClientXMPP):
    """A logged-in client; received messages and presences are queued for the scenario."""

    def __init__(self, jid, password, args, register=False):
        super().__init__(jid, password)
        self.args = args
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.ca_certs = args.ca
        self.messages = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.started = asyncio.get_running_loop().create_future()
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        self.register_plugin("xep_0203")
        if register:
            self.register_plugin("xep_0077")
            self.plugin["xep_0077"].force_registration = True
            self.add_event_handler("register", self.on_register)
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("presence", self.presences.put_nowait)
        self.add_event_handler("failed_auth", lambda _: self.fail("authentication failed"))
        self.add_event_handler("connection_failed", lambda e: self.fail(f"connection failed: {e}"))

    def fail(self, why):
        if not self.started.done():
            self.started.set_exception(AssertionError(why))

    async def on_register(self, _form):
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        await iq.send(timeout=TIMEOUT)

    async def on_start(self, _event):
        await self.get_roster(timeout=TIMEOUT)
        if not self.started.done():
            self.started.set_result(True)

    async def login(self, available=True):
        self.connect(self.args.host, self.args.port)
        await asyncio.wait_for(self.started, TIMEOUT)
        mech = self.plugin["feature_mechanisms"].mech.name
        check(mech.startswith("SCRAM-SHA-"), f"{self.boundjid}: SASL mechanism {mech}, SCRAM expected")
        check(self.is_secure(), f"{self.boundjid}: the stream is not encrypted")
        if available:
            self.send_presence()
        return self

    def is_secure(self):
        return isinstance(self.socket, ssl.SSLSocket) or (
            self.transport is not None and self.transport.get_extra_info("sslcontext") is not None
        )

    async def next_message(self, what, pred=lambda m: True):
        return await wait_for_item(self.messages, what, pred)

    async def next_presence(self, what, pred):
        return await wait_for_item(self.presences, what, pred)

    async def logout(self):
        self.disconnect()
        await asyncio.wait_for(self.disconnected, TIMEOUT)


async def wait_for_item(queue, what, pred):
    seen = []

    async def get():
        while True:
            item = await queue.get()
            if pred(item):
                return item
            seen.append(str(item))

    try:
        return await asyncio.wait_for(get(), TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {TIMEOUT} s; got instead: {seen}")


def check(ok, why):
    if not ok:
        raise AssertionError(why)


def jid(args, user, resource=None):
    j = f"{user}@{args.domain}"
    return f"{j}/{resource}" if resource else j


async def login_and_tls(args):
    alice = await Client(jid(args, "alice", "phone"), "alice-pw", args).login()
    result = await alice.plugin["xep_0199"].ping(jid=args.domain, timeout=TIMEOUT)
    check(result is not None, "no ping answer from the server")
    # A wrong password is refused.
    bad = Client(jid(args, "alice", "bad"), "wrong", args)
    bad.connect(args.host, args.port)
    try:
        await asyncio.wait_for(bad.started, TIMEOUT)
        raise AssertionError("a wrong password was accepted")
    except AssertionError as e:
        check("authentication failed" in str(e), str(e))
    bad.disconnect()
    await alice.logout()


async def roster_and_presence(args):
    alice = await Client(jid(args, "alice", "a"), "alice-pw", args).login()
    bob = await Client(jid(args, "bob", "b"), "bob-pw", args).login()
    # bob approves what he is asked and asks back (slixmpp's auto_authorize/auto_subscribe).
    bob.auto_authorize = True
    bob.auto_subscribe = True
    alice.auto_authorize = True
    await alice.update_roster(jid(args, "bob"), name="Bob", groups=["Friends"], timeout=TIMEOUT)
    alice.send_presence_subscription(pto=jid(args, "bob"))
    await alice.next_presence(
        "bob's available presence after the subscription",
        lambda p: p["from"].bare == jid(args, "bob") and p["type"] in ("available", ""),
    )
    for _ in range(100):
        item = alice.client_roster[jid(args, "bob")]
        if item["subscription"] == "both":
            break
        await asyncio.sleep(0.1)
    item = alice.client_roster[jid(args, "bob")]
    check(item["subscription"] == "both", f"alice's roster item for bob: {item['subscription']}")
    check(item["name"] == "Bob" and item["groups"] == ["Friends"], f"item: {item['name']} {item['groups']}")
    # A presence change reaches the contact, with its status and the client's xml:lang.
    bob.send_presence(pshow="away", pstatus="lunch")
    p = await alice.next_presence("bob's away presence", lambda p: p["show"] == "away")
    check(p["status"] == "lunch", f"status {p['status']!r}")
    # Going offline is seen.
    await bob.logout()
    await alice.next_presence(
        "bob's unavailable presence",
        lambda p: p["from"].bare == jid(args, "bob") and p["type"] == "unavailable",
    )
    # The roster is stored: a new session of alice gets it back.
    await alice.logout()
    again = await Client(jid(args, "alice", "a2"), "alice-pw", args).login()
    check(jid(args, "bob") in again.client_roster, "roster lost between sessions")
    check(again.client_roster[jid(args, "bob")]["subscription"] == "both", "subscription lost")
    await again.logout()


async def chat(args):
    alice = await Client(jid(args, "alice", "a"), "alice-pw", args).login()
    bob = await Client(jid(args, "bob", "b"), "bob-pw", args).login()
    alice.send_message(mto=jid(args, "bob", "b"), mbody="to the full JID", mtype="chat")
    m = await bob.next_message("the message to bob's full JID", lambda m: m["body"] == "to the full JID")
    check(m["from"] == jid(args, "alice", "a"), f"from {m['from']}")
    check(m["lang"] == "en", f"xml:lang {m['lang']!r} lost on the way")
    alice.send_message(mto=jid(args, "bob"), mbody="to the bare JID", mtype="chat")
    m = await bob.next_message("the message to bob's bare JID", lambda m: m["body"] == "to the bare JID")
    check(m["from"] == jid(args, "alice", "a"), f"from {m['from']}")
    # Markup and non-ASCII text arrive unchanged.
    text = "<b>&amp; 'quotes' \"too\" — ünïcödé 🐦"
    bob.send_message(mto=jid(args, "alice", "a"), mbody=text, mtype="chat")
    m = await alice.next_message("bob's answer", lambda m: m["from"].bare == jid(args, "bob"))
    check(m["body"] == text, f"body {m['body']!r}")
    # An unknown user's message comes back as an error.
    alice.send_message(mto=jid(args, "nobody"), mbody="hello?", mtype="chat")
    m = await alice.next_message("the error for an unknown user", lambda m: m["type"] == "error")
    check(m["error"]["condition"] == "service-unavailable", f"condition {m['error']['condition']}")
    await alice.logout()
    await bob.logout()


async def offline_send(args):
    alice = await Client(jid(args, "alice", "a"), "alice-pw", args).login()
    for i in range(3):
        alice.send_message(mto=jid(args, "carol"), mbody=f"offline {i}", mtype="chat")
    # A ping after the messages: the server has handled them when it answers.
    await alice.plugin["xep_0199"].ping(jid=args.domain, timeout=TIMEOUT)
    await alice.logout()


async def offline_receive(args):
    carol = await Client(jid(args, "carol", "c"), "carol-pw", args).login()
    for i in range(3):
        m = await carol.next_message(f"offline message {i}", lambda m, i=i: m["body"] == f"offline {i}")
        check(m["from"] == jid(args, "alice", "a"), f"from {m['from']}")
        check(m["lang"] == "en", f"xml:lang {m['lang']!r}")
        check(m["delay"]["stamp"] is not None, "no XEP-0203 delay stamp")
    await carol.logout()
    # Delivered once.
    carol = await Client(jid(args, "carol", "c2"), "carol-pw", args).login()
    try:
        m = await asyncio.wait_for(carol.messages.get(), 2)
        raise AssertionError(f"delivered again: {m}")
    except asyncio.TimeoutError:
        pass
    await carol.logout()


async def register(args):
    dave = Client(jid(args, "dave", "d"), "dave-pw", args, register=True)
    await dave.login()
    await dave.logout()
    # The new account logs in, and a second registration of the name is refused.
    await (await Client(jid(args, "dave", "d2"), "dave-pw", args).login()).logout()
    again = Client(jid(args, "dave", "d3"), "other-pw", args, register=True)
    again.connect(args.host, args.port)
    try:
        await asyncio.wait_for(again.started, TIMEOUT)
        raise AssertionError("registered the same name twice, or logged in with another password")
    except (AssertionError, slixmpp.exceptions.IqError) as e:
        check("twice" not in str(e), str(e))
    again.disconnect()


SCENARIOS = {
    "login": login_and_tls,
    "roster": roster_and_presence,
    "chat": chat,
    "offline-send": offline_send,
    "offline-receive": offline_receive,
    "register": register,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="the server's certificate (PEM) to verify against")
    p.add_argument("--domain", default="localhost")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR)
    try:
        asyncio.run(asyncio.wait_for(SCENARIOS[args.scenario](args), 120))
    except AssertionError as e:
        print(f"FAILED {args.scenario}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {args.scenario}")


if __name__ == "__main__":
    main()
