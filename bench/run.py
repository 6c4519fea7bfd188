"""Run every benchmark in bench/ (ratios measured within one run; noise is high on shared CPUs)."""
import runpy
from pathlib import Path

SEPARATE = {"run.py", "goals.py", "stage_times.py", "runtime_scaling.py", "runtime_common.py", "memory_scaling.py",
            "cost_curve.py", "conditions_training.py"}  # minutes each: run them on their own

for script in sorted(Path(__file__).parent.glob("*.py")):
    if script.name not in SEPARATE:
        print(f"== {script.name}")
        runpy.run_path(str(script), run_name="__main__")
