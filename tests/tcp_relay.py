"""A TCP relay that gives a test server a network address of its own (stdlib only).

tests/stand_in_macs.py runs one inside the stand-in Macs' network namespace per Mac:

    ip netns exec NS python tcp_relay.py --listen 198.18.0.2:8000 --to 198.18.0.1:41234

Connections to the listen address are relayed, both ways, to the upstream server (in the root
namespace, across the veth pair). The relay listens only while the upstream accepts
connections: it holds one idle connection to the upstream and, when that one ends or a relayed
connection is refused, checks again; a server that is down therefore reads as "connection
refused" at the listen address, as a stopped server on a real host does, and a restarted one is
reachable again within RETRY_SECONDS of listening. Stop the relay with SIGTERM or SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys

RETRY_SECONDS = 0.05


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, not a FIN (the client sees 'connection reset')."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


class Relay:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.listen, self.upstream = listen, upstream
        self.server: asyncio.AbstractServer | None = None
        self.canary: asyncio.StreamWriter | None = None

    def log(self, message: str) -> None:
        print(f"tcp_relay {self.listen[0]}:{self.listen[1]}: {message}", file=sys.stderr,
              flush=True)

    async def _start_listening(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._relay, *self.listen,
                                                     reuse_address=True)
            self.log(f"listening (upstream {self.upstream[0]}:{self.upstream[1]} is up)")

    def _stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()  # the listening socket; relayed connections go on
            self.server = None
            self.log("not listening (upstream refused)")

    async def run(self) -> None:
        while True:
            try:
                reader, self.canary = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._stop_listening()
                await asyncio.sleep(RETRY_SECONDS)
                continue
            await self._start_listening()
            try:  # held idle until the upstream closes it (or dies)
                while await reader.read(4096):
                    pass
            except OSError:
                pass
            self.canary.transport.abort()
            self.canary = None
            await asyncio.sleep(RETRY_SECONDS / 5)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            # Accepted in the moment between the upstream's death and the canary's end.
            self._stop_listening()
            if self.canary is not None:
                self.canary.transport.abort()
            _reset(client_w)
            return
        try:
            await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
        finally:
            up_w.close()
            client_w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=host_port, required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    try:
        asyncio.run(Relay(args.listen, args.to).run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
