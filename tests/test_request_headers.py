"""The relay's parse of request headers gives what pywsgi's stock (email-package) parse gives, faster."""

import io
import random

import pytest
from gevent import pywsgi

from wsrelay.websocket import parse_request_headers

BLOCKS = [
    b"Host: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"Host:example\r\nX-Empty:\r\nX-Spaces:   \r\nX-Tabs:\t\tv\t \r\nX-Trail: v  \r\n\r\nbody bytes",
    b"Host: a\nUpgrade: websocket\n\n",                           # bare LF
    b"Host: a\r\nX-Folded: first\r\n  second\r\n\tthird\r\nNext: n\r\n\r\n",
    b"Host: a\r\nno colon line\r\nAfter: x\r\n\r\n",
    b"Host: a\r\nBad Name: x\r\nAfter: x\r\n\r\n",
    b"Host: a\r\n: empty name\r\nAfter: x\r\n\r\n",
    b"From me\r\nHost: a\r\n\r\n",
    b"Host: a\r\nX-CR: a\rb\r\nAfter: x\r\n\r\n",
    b"Host: a\r\nX-Latin: caf\xe9 \xff\r\nX-Utf8: \xc3\xa9\r\n\r\n",
    b"Host: a\r\nX-Dup: 1\r\nx-dup: 2\r\nX-DUP: 3\r\n\r\n",
    b"Host: a\r\nX-Colons: a:b:c\r\n\r\n",
    b"Host: a\r\nX-Cut-Off: no end",
    b"\r\n",
    b"",
    b"Host: a\r\n" + b"X-Long: " + b"v" * 70000 + b"\r\n\r\n",
    b"Host: a\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(98)) + b"\r\n",
]


def stock(block):
    fp = io.BytesIO(block)
    message = pywsgi.headers_factory(fp)
    return message.status, list(message._headers), dict((k.lower(), message.get(k)) for k, _ in message._headers), \
        fp.tell()


def ours(block):
    fp = io.BytesIO(block)
    message = parse_request_headers(fp)
    return message.status, list(message._headers), dict((k.lower(), message.get(k)) for k, _ in message._headers), \
        fp.tell()


@pytest.mark.parametrize("block", BLOCKS)
def test_same_headers_as_the_stock_parse(block):
    assert ours(block) == stock(block)


def test_same_refusal_for_too_many_headers():
    block = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(101)) + b"\r\n"
    for parse in (pywsgi.headers_factory, parse_request_headers):
        with pytest.raises(Exception) as info:
            parse(io.BytesIO(block))
        assert "got more than 100 headers" in str(info.value)


def test_same_headers_on_random_blocks():
    rng = random.Random(7230)
    pieces = [b"Host: h", b"X-A: v", b"X-B:", b"  folded", b"\tfolded", b"no colon", b": x", b"X-C: a\rb",
              b"X-D: \xe9", b"X_E: under", b"X-F:  sp  ", b"From x", b"X-G: a:b"]
    for _ in range(2000):
        lines = [rng.choice(pieces) + rng.choice((b"\r\n", b"\n")) for _ in range(rng.randrange(0, 8))]
        block = b"".join(lines) + rng.choice((b"\r\n", b"\n", b"")) + b"rest"
        assert ours(block) == stock(block), block


def test_relay_handler_uses_it():
    from wsrelay.websocket import RelayHandler
    handler = RelayHandler.__new__(RelayHandler)
    message = handler.MessageClass(io.BytesIO(b"Host: a\r\n\r\n"), 0)
    assert message.get("host") == "a"
