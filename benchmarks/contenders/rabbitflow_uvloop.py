"""The rabbitflow contender on uvloop's event loop (`pip install uvloop`): what the loop costs."""

import os
import runpy

os.environ["RF_BENCH_UVLOOP"] = "1"
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rabbitflow.py"), run_name="__main__")
