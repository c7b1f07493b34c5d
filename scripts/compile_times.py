"""Cold compile and disk-cache load times of the modules a DeepSeek decode step needs.

Runs ``mla_cupy.warmup`` (bf16, head dims 576/512, 128 query rows per KV head) twice, each in a
fresh process sharing one new, empty cache directory: the first compiles every module with
NVRTC, the second loads them from the disk cache. Prints seconds per module for both.

Usage: ``python scripts/compile_times.py`` (needs a GPU).
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import json, mla_cupy
seconds = mla_cupy.warmup(head_dims=[(576, 512)], dtypes=["bfloat16"], num_q_tokens_per_head_k=128)
print(json.dumps(seconds))
"""


def run_once(cache_dir):
    env = dict(os.environ, MLA_CUPY_CACHE_DIR=cache_dir,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    with tempfile.TemporaryDirectory(prefix="mla_cupy_cache_") as cache_dir:
        cold = run_once(cache_dir)
        warm = run_once(cache_dir)
    print(f"{'module':40s} {'cold compile s':>15s} {'cache load s':>13s}")
    for name in cold:
        print(f"{name:40s} {cold[name]:15.3f} {warm.get(name, float('nan')):13.3f}")
    print(f"{'total':40s} {sum(cold.values()):15.3f} {sum(warm.values()):13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
