"""The rabbitflow contender whose handler takes dependencies (issue 24): a sync one, an async one
that depends on it, and a generator whose teardown runs after each attempt. Compare with the plain
contender for what `Depends` costs per message."""

import os
from collections.abc import Iterator
from typing import Annotated, Any

namespace = __import__("runpy").run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="rabbitflow_bench"
)
module = namespace["_consume"].__globals__  # the functions' own globals: patch the handler there
benchlib = module["benchlib"]


def _consumer_app(rf: Any, args: Any, counter: Any, mode: str) -> Any:
    app = module["_app"](rf, args)
    Depends = rf.Depends

    def settings() -> dict[str, int]:
        return {"factor": 2}

    async def scale(config: Annotated[dict[str, int], Depends(settings)]) -> int:
        return config["factor"]

    def session() -> Iterator[list[int]]:
        held: list[int] = []
        yield held
        held.clear()

    @app.consumer(args.queue, queue_type=args.queue_type, retries=1, delay=module["RETRY_DELAY"])
    async def handle(
        body: dict,  # type: ignore[type-arg]
        factor: Annotated[int, Depends(scale)],
        held: Annotated[list[int], Depends(session)],
    ) -> None:
        held.append(factor)
        if mode == "mixed":
            await benchlib.mixed_handler(body)
        if counter is not None:
            counter.hit()

    return app


module["_consumer_app"] = _consumer_app

if __name__ == "__main__":
    benchlib.contender_main(
        "rabbitflow_depends",
        {"consume": module["consume"], "mixed": module["mixed"]},
        import_module="rabbitflow",
        declares_own_queue=True,
        declare=module["declare"],
        notes="as rabbitflow, with Depends: a sync dependency, an async one on it, a generator (teardown)",
        extra={"cleanup": module["CLEANUP"]},
    )
