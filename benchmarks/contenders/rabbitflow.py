"""rabbitflow, through its public API only.

rabbitflow declares its consumer queue itself (with its own arguments: dead
letter exchange, retry queues, ...), so the runner calls this script once with
``--phase declare`` (a short-lived ``async with app:`` on an empty queue),
then pre-fills the queue with aiormq, then runs the timed phase in a fresh
process: a second ``async with app:`` until N messages were handled.

consume: ``@app.consumer(q, queue_type=..., retries=1, delay=0.05)`` on
``async def handle(body: dict) -> None``; the app acks after the handler.
The count is taken inside the handler; leaving ``async with app:`` is
expected to drain in-flight handlers and their acks (the runner checks that
the queue is empty afterwards).

mixed: the same consumer (same topology as consume), with
``benchlib.mixed_handler`` awaited in the handler: 1 message in 500 awaits
``asyncio.sleep(0.1)``.

retry: the handler also takes ``message: Message``; with ``--mode fail_once``
it raises on ``message.attempt == 1`` and succeeds on the (delayed) retry;
with ``--mode all_ok`` the same handler never raises.  Timing ends when N
messages completed successfully.

publish: ``await app.publish(doc, exchange="", routing_key=q)`` (returns
after the broker's confirm), windows awaited with gather.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
from typing import Any  # noqa: E402

import benchlib  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(_HERE))
RETRY_DELAY = 0.05

# Names rabbitflow may create for a consumer queue ``{queue}`` in app
# ``{app}``.  The runner deletes these by trying (not-found is ignored) and
# also sweeps anything left with the run's prefix at the end.
CLEANUP = {
    "queues": ["{queue}", "{queue}.parked", "{queue}.retry.50ms"],
    "exchanges": ["{app}.dlx"],
}


def _import() -> Any:
    try:
        import rabbitflow
    except ImportError:
        sys.path.append(REPO_ROOT)  # the work tree, if rabbitflow is not installed
        try:
            import rabbitflow
        except ImportError as exc:
            raise SystemExit(
                f"rabbitflow contender: cannot import rabbitflow ({exc!r}); "
                f"install it (pip install -e .) or run from the repo root"
            ) from None
    missing = [a for a in ("App", "Message") if not hasattr(rabbitflow, a)]
    if missing:
        raise SystemExit(f"rabbitflow contender: rabbitflow has no {', '.join(missing)}")
    return rabbitflow


# RF_BENCH_UVLOOP=1: run the contender on uvloop's event loop instead of asyncio's (a probe, not part
# of the default run: every contender runs on the default asyncio loop there).
UVLOOP = os.environ.get("RF_BENCH_UVLOOP") == "1"
if UVLOOP:
    try:
        import uvloop
    except ImportError:
        raise SystemExit("RF_BENCH_UVLOOP=1 needs uvloop: pip install uvloop") from None
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

# The middleware variants (contenders/rabbitflow_<variant>.py set it): what the seam and the
# metrics and tracing middlewares cost on the same workload.
VARIANT = os.environ.get("RF_BENCH_MIDDLEWARE", "")


def _middleware(rf: Any) -> list[Any]:
    if VARIANT == "seam":  # a middleware that overrides nothing: the seam's own cost
        return [rf.Middleware()]
    if VARIANT == "prometheus":
        from prometheus_client import CollectorRegistry

        from rabbitflow.prometheus import PrometheusMiddleware

        return [PrometheusMiddleware(CollectorRegistry())]
    if VARIANT == "otel":
        from opentelemetry.sdk.trace import TracerProvider

        from rabbitflow.opentelemetry import TelemetryMiddleware

        return [TelemetryMiddleware(TracerProvider())]  # spans made and ended, exported nowhere
    return []


def _app(rf: Any, args: argparse.Namespace) -> Any:
    return rf.App(
        args.app_name,
        url=args.url,
        prefetch=args.prefetch,
        concurrency=args.prefetch,
        middleware=_middleware(rf),
    )


def _consumer_app(
    rf: Any,
    args: argparse.Namespace,
    counter: benchlib.Counter | None,
    mode: str,
    latencies: benchlib.Latencies | None = None,
) -> Any:
    app = _app(rf, args)
    Message = rf.Message
    deco = app.consumer(args.queue, queue_type=args.queue_type, retries=1, delay=RETRY_DELAY)

    if mode == "consume":

        @deco
        async def handle(body: dict) -> None:  # type: ignore[type-arg]
            if counter is not None:
                counter.hit()

    elif mode == "latency":
        assert latencies is not None
        record = latencies.handler

        @deco
        async def handle_latency(body: dict) -> None:  # type: ignore[type-arg]
            await record(body)
            if counter is not None:
                counter.hit()

    elif mode == "mixed":
        work = benchlib.mixed_handler

        @deco
        async def handle_mixed(body: dict) -> None:  # type: ignore[type-arg]
            await work(body)
            if counter is not None:
                counter.hit()

    else:
        fail_once = mode == "fail_once"

        # rabbitflow inspects the handler's annotations (real objects here:
        # this file does not use `from __future__ import annotations`)
        async def handle_with_message(body: dict, message: Message) -> None:  # type: ignore[type-arg,valid-type]
            if fail_once and message.attempt == 1:
                raise RuntimeError("bench: fail on first delivery")
            if counter is not None:
                counter.hit()

        deco(handle_with_message)
    return app


async def declare(args: argparse.Namespace) -> dict[str, Any]:
    rf = _import()
    mode = "consume" if args.scenario in ("consume", "rss", "mixed", "latency") else args.mode or "all_ok"
    app = _consumer_app(rf, args, None, mode)
    async with app:
        pass
    return {"declared": True}


async def _consume(args: argparse.Namespace, mode: str, rss: bool) -> dict[str, Any]:
    rf = _import()
    sampler = benchlib.RssSampler() if rss else None
    counter = benchlib.Counter(args.n, on_warm=sampler.mark_warm if sampler else None)
    latencies = benchlib.Latencies(args.n) if mode == "latency" else None
    app = _consumer_app(rf, args, counter, mode, latencies)
    if sampler:
        sampler.start()
    t0 = benchlib.start_clock()
    async with app:  # connects, declares, starts consuming
        t_end = await counter.done
    result = benchlib.timing_result(args.n, t0, t_end, counter)
    if sampler:
        result.update(await sampler.stop())
    if latencies is not None:
        result.update(latencies.summary())
    return result


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, "consume", rss=False)


async def rss(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, "consume", rss=True)


async def mixed(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, "mixed", rss=False)


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, "latency", rss=False)


async def retry(args: argparse.Namespace) -> dict[str, Any]:
    if args.mode not in ("fail_once", "all_ok"):
        raise SystemExit(f"retry needs --mode fail_once|all_ok, got {args.mode!r}")
    return await _consume(args, args.mode, rss=False)


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    rf = _import()
    docs = benchlib.make_messages(args.n)
    app = _app(rf, args)
    q = args.queue
    w = args.window
    async with app:
        t0 = benchlib.start_clock()
        for start in range(0, len(docs), w):
            await asyncio.gather(
                *(app.publish(d, exchange="", routing_key=q) for d in docs[start : start + w])
            )
        t_end = benchlib.stop_clock()
    return benchlib.timing_result(args.n, t0, t_end)


if __name__ == "__main__":
    benchlib.contender_main(
        "rabbitflow" + (f"_{VARIANT}" if VARIANT else "") + ("_uvloop" if UVLOOP else ""),
        {
            "consume": consume,
            "latency": latency,
            "mixed": mixed,
            "publish": publish,
            "retry": retry,
            "rss": rss,
        },
        import_module="rabbitflow",
        declares_own_queue=True,
        declare=declare,
        notes=(
            f"App(prefetch=256, concurrency=256), @app.consumer(retries=1, delay={RETRY_DELAY}); "
            "acks are rabbitflow's own: after the handler, but it may coalesce them into "
            "basic.ack(multiple=True) frames (see rabbitflow/runtime/settlement.py), so compare it with "
            "aiormq_batched as well as with aiormq_raw"
        ),
        extra={"cleanup": CLEANUP},
    )
