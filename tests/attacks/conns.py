#!/usr/bin/python3
"""Connection-level attack clients against an HTTPS server on loopback.

  handshakes   TCP connections that never finish their TLS handshake: half send nothing, half
               the first bytes of a ClientHello.
  flood        one address opening TCP connections as fast as it can (--count in all).
  slowloris    TLS connections that send a request's headers one byte every --interval seconds.
  idle         TLS connections that send one request, read the answer and then stay idle.
  slow-reader  TLS connections with a small receive buffer that ask for a large answer and stop
               reading after its head.

Each holds --connections at once for at most --seconds (with --reconnect, a connection the
server closes is replaced), then prints one JSON line: how many connections were opened, how
many the server closed, and how long it took to close them (from the connection, the first
header byte or the answer on).
"""

import asyncio
import socket
import time

import common

# The start of a TLS record that announces a 512-byte ClientHello, and 6 of its bytes.
PARTIAL_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


class Stats:
    def __init__(self):
        self.opened = 0
        self.failed = 0
        self.closed = 0
        self.close_after = []
        self.held = []
        self.answered = 0
        self.received = 0

    def cut(self, since):
        self.closed += 1
        self.close_after.append(time.monotonic() - since)

    def kept(self, since):
        """The connection was still open when the attack ended."""
        self.held.append(time.monotonic() - since)

    async def until_closed(self, args, reader, writer, since=None):
        """Waits for the relay to close the connection (or the attack to end), counts which it
        was from `since` (now by default), and closes our end."""
        since = time.monotonic() if since is None else since
        if await common.closed_by_relay(reader, common.left(args)):
            self.cut(since)
        else:
            self.kept(since)
        common.close(writer)


async def handshakes(args, i, stats, _ctx):
    reader, writer = await common.connect(args, i)
    stats.opened += 1
    if i % 2:
        writer.write(PARTIAL_HELLO)
    await stats.until_closed(args, reader, writer)


async def slowloris(args, i, stats, ctx):
    reader, writer = await common.connect(args, i, ctx)
    stats.opened += 1
    head = f"GET /healthz HTTP/1.1\r\nhost: {args.sni}\r\n".encode() + b"x-slow: " + b"a" * 10_000
    since = time.monotonic()
    for byte in head:
        writer.write(bytes([byte]))
        try:
            # Waiting for the next byte's turn is also how the client sees the server close.
            async with asyncio.timeout(min(args.interval, common.left(args))):
                if not await reader.read(1024):
                    stats.cut(since)
                    break
        except TimeoutError:
            if common.left(args) == 0:
                stats.kept(since)
                break
        except OSError:
            stats.cut(since)
            break
    common.close(writer)


async def idle(args, i, stats, ctx):
    reader, writer = await common.connect(args, i, ctx)
    stats.opened += 1
    writer.write(f"GET /healthz HTTP/1.1\r\nhost: {args.sni}\r\n\r\n".encode())
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\nok")
    stats.answered += 1
    await stats.until_closed(args, reader, writer)


async def slow_reader(args, i, stats, ctx):
    reader, writer = await common.connect(args, i, ctx, rcvbuf=4096, limit=4096)
    stats.opened += 1
    writer.write(f"{args.method} {args.path} HTTP/1.1\r\nhost: {args.sni}\r\ncontent-length: 0\r\n\r\n".encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    stats.answered += head.startswith(b"HTTP/1.1 200")
    since = time.monotonic()
    # Reads nothing more until the attack ends; then whatever is left (counted in `received`),
    # to see whether the server gave up on the answer: it closed before sending all of it.
    await asyncio.sleep(common.left(args))
    # The server's kernel still delivers what it had buffered (megabytes) before its FIN: take
    # it fast, through a large receive buffer.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    got = 0
    try:
        async with asyncio.timeout(10):
            while chunk := await reader.read(64 * 1024):
                got += len(chunk)
            stats.cut(since)
    except TimeoutError:
        stats.kept(since)
    except OSError:
        stats.cut(since)
    stats.received += got
    common.close(writer)


async def flood(args, stats):
    """--connections connectors open --count connections as fast as they can; each is closed
    when the server closes it, or at the end of the attack."""
    holding = set()

    async def hold(reader, writer, since):
        await stats.until_closed(args, reader, writer, since)

    async def connector():
        while stats.opened + stats.failed < args.count and common.left(args) > 0:
            try:
                reader, writer = await common.connect(args, 0)
            except OSError:
                stats.failed += 1
                continue
            stats.opened += 1
            task = asyncio.create_task(hold(reader, writer, time.monotonic()))
            holding.add(task)
            task.add_done_callback(holding.discard)

    await asyncio.gather(*(connector() for _ in range(args.connections)))
    await asyncio.gather(*holding)


async def main():
    p = common.parser(__doc__)
    p.add_argument("mode", choices=["handshakes", "flood", "slowloris", "idle", "slow-reader"])
    p.add_argument("--count", type=int, default=1000, help="flood: connections in all")
    p.add_argument("--interval", type=float, default=0.2, help="slowloris: seconds between two bytes")
    p.add_argument("--method", default="GET", help="slow-reader: the request's method")
    p.add_argument("--path", default="/", help="slow-reader: a path with a large answer")
    args = common.parse(p)
    stats = Stats()
    started = time.monotonic()
    if args.mode == "flood":
        await flood(args, stats)
    else:
        attack = {"handshakes": handshakes, "slowloris": slowloris, "idle": idle, "slow-reader": slow_reader}[args.mode]
        ctx = None if args.mode == "handshakes" else common.tls_context(args, ["http/1.1"])
        def failed():
            stats.failed += 1

        errors = (OSError, TimeoutError, asyncio.IncompleteReadError)
        await common.workers(args, attack, stats, ctx, errors=errors, on_error=failed)
    common.emit(
        mode=args.mode,
        opened=stats.opened,
        failed=stats.failed,
        answered=stats.answered,
        closed_by_server=stats.closed,
        close_after_p50=common.percentile(stats.close_after, 50),
        close_after_max=common.percentile(stats.close_after, 100),
        held_max=common.percentile(stats.held, 100),
        received=stats.received,
        seconds=round(time.monotonic() - started, 3),
    )


if __name__ == "__main__":
    asyncio.run(main())
