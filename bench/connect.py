"""TCP connect time where the worker's rules are: ``ip netns exec NS python -m bench.connect N``.

Connects N times to a listener on the namespace's loopback, in 10 rounds, and prints one JSON
object with the lowest round's median and the 90th percentile of all, in microseconds (the
lowest median: other processes on the machine only ever add to a round's time). The process
keeps to two CPUs, one for connecting and one for accepting: left to the scheduler, some
rounds took twice as long. Each connect's three packets
(SYN, SYN-ACK, ACK) pass the input hook, so every rule there is walked three times: what a
new connection pays for the firewall. The client closes with a reset (``SO_LINGER`` 0) so
that no port is left in TIME_WAIT.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import sys
import threading
import time

WARM_UP = 200
ROUNDS = 10


def _accept(listener: socket.socket, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})  # this thread only
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


def measure(count: int) -> dict[str, float]:
    """Connect ``count`` times (after a warm-up); the connect times in microseconds."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    threading.Thread(target=_accept, args=(listener, cpus[-1]), daemon=True).start()
    address = listener.getsockname()
    samples: list[float] = []
    for i in range(WARM_UP + count):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        started = time.perf_counter_ns()
        client.connect(address)
        elapsed = time.perf_counter_ns() - started
        client.close()
        if i >= WARM_UP:
            samples.append(elapsed / 1000)
    listener.close()
    size = max(1, len(samples) // ROUNDS)
    rounds = [samples[i : i + size] for i in range(0, len(samples), size)]
    return {
        "median_us": min(statistics.median(r) for r in rounds),
        "p90_us": statistics.quantiles(samples, n=10)[8],
        "samples": len(samples),
    }


if __name__ == "__main__":
    json.dump(measure(int(sys.argv[1])), sys.stdout)
