"""What the attack clients share: their arguments, the loopback-only check, connecting (from a
spread of source addresses, with TLS or without), waiting for the relay to close a connection,
and the one JSON line each client prints when it is done.

Every client is bounded twice: by a count (connections, frames, requests) and by --seconds,
after which it closes what it still holds and exits by itself.
"""

import argparse
import asyncio
import ipaddress
import json
import logging
import resource
import socket
import ssl
import sys
import time


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1", help="the relay's address (loopback only)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", default="localhost", help="the TLS server name, and the Host")
    p.add_argument("--ca", help="PEM file of the CA to trust; none: the certificate is not checked")
    p.add_argument("--src", default="127.0.0.1", help="the first source address")
    p.add_argument("--src-count", type=int, default=1, help="spread connections over this many addresses from --src up")
    p.add_argument("--connections", type=int, default=1, help="how many the client holds at once")
    p.add_argument("--seconds", type=float, default=3.0, help="how long the attack lasts at most")
    p.add_argument("--reconnect", action="store_true", help="open a new connection when the relay closes one")
    return p


def parse(p):
    """Parses the arguments, refuses anything but loopback, and lets the process hold as many
    sockets as the hard limit allows."""
    args = p.parse_args()
    # asyncio logs every write to a connection the server has closed; closing is its answer.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    for a in sources(args) + [args.host]:
        if not ipaddress.ip_address(a).is_loopback:
            sys.exit(f"{a}: the attack clients work on loopback only")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.until = time.monotonic() + args.seconds
    return args


def sources(args):
    first = ipaddress.ip_address(args.src)
    return [str(first + i) for i in range(args.src_count)]


def left(args):
    """Seconds left until the end of the attack (never negative)."""
    return max(0.0, args.until - time.monotonic())


def tls_context(args, alpn):
    if args.ca:
        ctx = ssl.create_default_context(cafile=args.ca)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


# At most this many connections are being set up at once, so that their SYNs fit the server's
# accept backlog instead of waiting for the kernel's retransmission.
SETTING_UP = asyncio.Semaphore(64)


async def connect(args, i, ctx=None, rcvbuf=None, limit=64 * 1024):
    """Connection number `i`, from source address i mod --src-count; TLS when `ctx` is given.
    `rcvbuf` sets a small receive buffer before connecting, so a client that stops reading
    fills it fast."""
    async with SETTING_UP:
        return await _connect(args, i, ctx, rcvbuf, limit)


async def _connect(args, i, ctx, rcvbuf, limit):
    src = sources(args)[i % args.src_count]
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((src, 0))
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (args.host, args.port)), 5)
        return await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=args.sni if ctx else None, limit=limit), 10
        )
    except BaseException:
        sock.close()
        raise


async def closed_by_relay(reader, within):
    """Reads (and discards) until the relay closes the connection, for at most `within`
    seconds: True when it closed (an end or a reset), False when it is still open."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(64 * 1024):
                pass
        return True
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def close(writer):
    try:
        writer.transport.abort()
    except Exception:
        pass


async def workers(args, attack, *extra, errors=(OSError, TimeoutError), on_error=None):
    """Runs `attack(args, i, *extra)` on `args.connections` connections at once until the
    attack's time is up, each again after it ends when `args.reconnect` says so. An error in
    `errors` counts through `on_error` and is followed by a short pause."""

    async def worker(i):
        while left(args) > 0:
            try:
                await attack(args, i, *extra)
            except errors:
                if on_error:
                    on_error()
                await asyncio.sleep(0.05)
            if not args.reconnect:
                return

    await asyncio.gather(*(worker(i) for i in range(args.connections)))


def percentile(values, p):
    """The p-th percentile (nearest rank) of `values`, rounded to ms; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 3)


def emit(**fields):
    """The client's one line of output: what it did and what it saw."""
    print(json.dumps(fields, sort_keys=True), flush=True)
