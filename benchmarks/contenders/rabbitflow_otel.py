"""The rabbitflow contender with TelemetryMiddleware on an SDK TracerProvider with no exporter."""

import os
import runpy

os.environ["RF_BENCH_MIDDLEWARE"] = "otel"
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="__main__")
