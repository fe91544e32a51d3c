"""The rabbitflow contender with a sync (`def`) handler, run in worker threads (issue 24): in the
mixed scenario 1 message in 500 blocks its thread for 0.1 s (time.sleep) while the others go on."""

import os
import time
from typing import Any

namespace = __import__("runpy").run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="rabbitflow_bench"
)
module = namespace["_consume"].__globals__  # the functions' own globals: patch the handler there
benchlib = module["benchlib"]


def _consumer_app(rf: Any, args: Any, counter: Any, mode: str) -> Any:
    app = module["_app"](rf, args)
    slow = mode == "mixed"
    hit = None if counter is None else counter.hit
    loop = __import__("asyncio").get_running_loop()  # the counter lives on the loop, not in threads

    @app.consumer(args.queue, queue_type=args.queue_type, retries=1, delay=module["RETRY_DELAY"])
    def handle(body: dict) -> None:  # type: ignore[type-arg]
        if slow and body["id"] % benchlib.SLOW_EVERY == 0:
            time.sleep(benchlib.SLOW_SECONDS)
        if hit is not None:
            loop.call_soon_threadsafe(hit)

    return app


module["_consumer_app"] = _consumer_app

if __name__ == "__main__":
    benchlib.contender_main(
        "rabbitflow_sync",
        {"consume": module["consume"], "mixed": module["mixed"]},
        import_module="rabbitflow",
        declares_own_queue=True,
        declare=module["declare"],
        notes="as rabbitflow, with a sync `def` handler in worker threads; mixed: time.sleep(0.1)",
        extra={"cleanup": module["CLEANUP"]},
    )
