"""The rabbitflow contender with a Middleware that overrides no hook (the seam's own cost)."""

import os
import runpy

os.environ["RF_BENCH_MIDDLEWARE"] = "seam"
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="__main__")
