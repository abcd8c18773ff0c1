"""A strict, independent echo peer for the conformance run: the `websockets` library's asyncio server.

Every data message comes back as one message of the same type (text stays text, binary stays binary).  It is
the upstream behind wsrelay in the conformance run and also the "direct" reference Autobahn is pointed at, so any
difference between the two runs comes from the relay.

    python conformance/echo_upstream.py --port 0 --port-file PORTFILE
    python conformance/echo_upstream.py --probe ws://127.0.0.1:PORT/v1/responses

With ``--port 0`` the system picks a free port; the bound port is written to ``--port-file`` (atomically) once
the server listens.  SIGTERM or SIGINT stops it.  ``--probe URL`` instead checks that a text and a binary message
come back unchanged from URL (exit status 0) before Autobahn is let loose on it.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys

# websockets fails a message of more than 4096 fragments with 1009 "too many fragments" (a denial-of-service
# guard).  Autobahn 9.3.1-9.3.3 and 9.4.1-9.4.3 send 4 MiB in 64..1024-byte fragments (up to 65536 of them):
# allow that, so those cases exercise the relay's frame walking instead of stopping at the echo's limit.
# Read by websockets when it is imported.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))

from websockets.asyncio.client import connect  # noqa: E402
from websockets.asyncio.server import serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

# Autobahn's largest messages (9.1.6, 9.2.6) are 16 MiB; leave room above that.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass  # the peer (Autobahn, or the relay on its behalf) broke the protocol or vanished: nothing to echo


def _write_port_file(path, port):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.replace(tmp, path)


async def probe(url):
    async with connect(url, compression=None, open_timeout=5, close_timeout=2, ping_interval=None) as ws:
        for message in ("conformance probe", b"\x00conformance probe\xff"):
            await ws.send(message)
            answer = await asyncio.wait_for(ws.recv(), 5)
            if answer != message:
                raise SystemExit("probe: sent %r, got %r back" % (message, answer))


async def main(host, port, port_file):
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    async with serve(echo, host, port, max_size=MAX_MESSAGE_BYTES, compression=None, ping_interval=None,
                     close_timeout=5) as server:
        bound = server.sockets[0].getsockname()[1]
        if port_file:
            _write_port_file(port_file, bound)
        print("echo upstream listening on ws://%s:%d/" % (host, bound), file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--probe", metavar="URL", help="check that URL echoes, then exit (no server)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.probe:
        try:
            asyncio.run(probe(args.probe))
        except Exception as exc:  # refused, reset, timed out, bad handshake: all mean "not usable"
            raise SystemExit("probe: %s: %s" % (args.probe, exc or exc.__class__.__name__))
    else:
        asyncio.run(main(args.host, args.port, args.port_file))
