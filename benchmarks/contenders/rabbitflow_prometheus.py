"""The rabbitflow contender with PrometheusMiddleware on a private registry."""

import os
import runpy

os.environ["RF_BENCH_MIDDLEWARE"] = "prometheus"
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="__main__")
