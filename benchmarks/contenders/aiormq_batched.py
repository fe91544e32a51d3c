"""Client ceiling: aiormq_raw, but acking every 64th tag with multiple=True.

Same code as aiormq_raw.py (loaded from there by path), only the ack differs.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_bench_aiormq_raw", os.path.join(os.path.dirname(os.path.abspath(__file__)), "aiormq_raw.py")
)
assert _spec is not None
assert _spec.loader is not None
_raw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_raw)

if __name__ == "__main__":
    _raw.main("aiormq_batched", batched=True)
