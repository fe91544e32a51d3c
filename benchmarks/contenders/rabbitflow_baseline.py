"""The rabbitflow contender of another checkout (RF_BASELINE=/path/to/checkout), measured in the
same run as this one: before/after tables of a change, side by side.

    git worktree add /tmp/before <commit>
    RF_BASELINE=/tmp/before python benchmarks/run.py --contenders rabbitflow_baseline,rabbitflow
"""

import os
import runpy
import sys

checkout = os.environ.get("RF_BASELINE")
if not checkout:
    raise SystemExit("rabbitflow_baseline: set RF_BASELINE to the checkout to measure")
here = os.path.dirname(os.path.abspath(__file__))
# Not this folder (its aio_pika.py would shadow the library); the checkout's rabbitflow first.
sys.path[:] = [checkout] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
runpy.run_path(os.path.join(checkout, "benchmarks", "contenders", "rabbitflow.py"), run_name="__main__")
