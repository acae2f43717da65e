"""Run a snippet of Python in a process of its own and measure it: wall time, CPU time (user, kernel), minor page
faults and peak RSS (VmHWM: this process alone; getrusage's ru_maxrss would start from the RSS of the benchmark
that started it, as a fork's does)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import json, re, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
{setup}
started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
{body}
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": time.perf_counter() - started, "user": after.ru_utime - before.ru_utime,
                  "system": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt,
                  "peak_rss": int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024}}))
"""


def measure(body: str, setup: str = "") -> dict:
    """seconds, user, system, minor_faults and peak_rss (bytes) of running `body` after the untimed `setup` (the
    project's root importable)."""
    result = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT), setup=setup, body=body)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])
