"""What a sleep costs the work after it: ``taskset -c 1 python -m benchmarks.cold_work``.

A fixed piece of Python work (decode and encode a Claude-Code-shaped request body with orjson,
pickle it, build 2000 small strings) is done 200 times back to back, then with a sleep of 2, 20
and 100 ms between pieces; printed: the CPU time (``process_time``) per piece. On a machine
where a process that slept comes back to cold caches (or a slower core), the pieces after a
sleep cost more CPU. This is why the recorder records in batches of up to 0.25 s rather than
as each exchange arrives (``otelproxy.recorder_process.LINGER``).
"""

from __future__ import annotations

import pickle
import time

import orjson

from benchmarks import traffic

_BODY = traffic.conversation_request("cold", 6)


def piece() -> int:
    decoded = orjson.loads(_BODY)
    encoded = orjson.dumps(decoded)
    pickle.loads(pickle.dumps(decoded))
    strings = [str(number) for number in range(2000)]
    return len(encoded) + len(strings)


def main() -> int:
    for sleep_s in (0.0, 0.002, 0.02, 0.1):
        piece()
        count = 50 if sleep_s >= 0.1 else 200
        began = time.process_time()
        for _ in range(count):
            piece()
            if sleep_s:
                time.sleep(sleep_s)
        used = time.process_time() - began
        print(f"sleep {sleep_s * 1000:5.0f} ms between pieces: "
              f"{used * 1000 / count:.3f} ms of CPU per piece")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
