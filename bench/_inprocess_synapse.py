"""Start Synapse inside this Python process (the way an in-process test harness would)
and print how long it took, as JSON. Run by bench/synapse_start.py in a fresh process
for every sample, since one process can host only one such homeserver cleanly."""

from __future__ import annotations

import json
import sys
import time

started = time.monotonic()
import treq  # noqa: E402
from synapse.app import homeserver  # noqa: E402
from synapse.logging.context import LoggingContext  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402

imported = time.monotonic()


def main(config_path: str, health_url: str) -> None:
    result: dict[str, float] = {"import_seconds": imported - started}

    async def start() -> None:
        try:
            await homeserver.start(hs, freeze=False)
            response = await treq.get(health_url)
            assert response.code == 200, response.code
            result["start_seconds"] = time.monotonic() - setup_started
        finally:
            reactor.stop()

    with LoggingContext(name="main", server_name="example.org"):
        setup_started = time.monotonic()
        config = homeserver.load_or_generate_config(["-c", config_path])
        hs = homeserver.create_homeserver(config)
        homeserver.setup(hs)
        reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
        reactor.run()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
