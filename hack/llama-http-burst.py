"""How often a fresh llama-server leaves a burst of new connections unanswered (docs/gateway.md).

Starts N fresh llama-servers one after another (tiny random model, -np 4) and sends each a burst of
24 concurrent chat requests through one aiohttp pool, as the gateway does, while /metrics is scraped
every 0.2 s. Prints, per server, the slowest request; a server stalls if any request takes over 10 s.

    .venv/bin/python hack/llama-http-burst.py --servers 12 --keepalive 60                     # stalls
    .venv/bin/python hack/llama-http-burst.py --servers 12 --keepalive 60 --threads-http 64   # does not
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from kubeinfer import contract
from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.engines.llamacpp import ensure_llama_server, vocab_gguf
from kubeinfer_devkit.engines.tinymodels import make_tiny_gguf

HOST = "127.0.0.71"
BURST = 24
BODY = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 30, "ignore_eos": True}


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=1).status_code == 200


async def burst(url: str, keepalive: float) -> float:
    """The slowest of BURST concurrent requests (40 s if any did not finish in 40 s)."""
    timeout = aiohttp.ClientTimeout(total=40)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        done = asyncio.Event()

        async def scrape() -> None:
            while not done.is_set():
                async with session.get(f"{url}/metrics") as r:
                    await r.read()
                await asyncio.sleep(0.2)

        async def one() -> float:
            started = time.monotonic()
            try:
                async with session.post(f"{url}/v1/chat/completions", json=BODY) as r:
                    await r.read()
            except TimeoutError:
                return 40.0
            return time.monotonic() - started

        scraper = asyncio.create_task(scrape())
        slowest = max(await asyncio.gather(*(one() for _ in range(BURST))))
        done.set()
        await scraper
        return slowest


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--servers", type=int, default=12)
    parser.add_argument("--threads-http", type=int, default=None, help="passed to llama-server if given")
    parser.add_argument("--keepalive", type=float, default=contract.UPSTREAM_KEEPALIVE_SECONDS,
                        help="idle connections kept this long (default: the gateway's)")  # fmt: skip
    args = parser.parse_args()
    binary = ensure_llama_server()
    work = Path(tempfile.mkdtemp(prefix="llama-burst-"))
    model = make_tiny_gguf(work / "tiny.gguf", vocab_gguf())
    extra = ["--threads-http", str(args.threads_http)] if args.threads_http else []
    stalled = 0
    for n in range(args.servers):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        argv = [str(binary), "-m", str(model), "--host", HOST, "--port", str(port), "--metrics",
                "-c", "16384", "-np", "4", *extra]  # fmt: skip
        server = procs.Child("llama-server", argv, work / "llama-server.log").start()
        try:
            url = f"http://{HOST}:{port}"
            procs.wait_until("llama-server /health", functools.partial(healthy, url), 60, child=server)
            slowest = asyncio.run(burst(url, args.keepalive))
        finally:
            server.stop(5.0)
        stalled += slowest > 10
        print(f"server {n}: slowest of {BURST} requests {slowest:.1f} s", flush=True)
    print(f"{stalled} of {args.servers} servers stalled (a request over 10 s)")


if __name__ == "__main__":
    main()
