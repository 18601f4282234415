"""Exports every build of sage8's CuTe DSL kernel (kontext_kernels/cute_runtime.VARIANTS) as an object file,
DIR/<name>.o, for a GPU machine without the DSL's compiler (bench/attention/cute_on_device.sh links and times them).

    CUTE_DSL_ARCH=sm_90a python3 bench/attention/cute_export.py .whl/rt

Needs `nvidia-cutlass-dsl` and `apache-tvm-ffi` (the `hopper` extra); no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from kontext_kernels import cute_runtime, sage_attention_cute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--only", nargs="*", choices=list(cute_runtime.VARIANTS), help="these builds only")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    for name, variant in cute_runtime.VARIANTS.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        sage_attention_cute.export(str(args.directory / f"{name}.o"), cute_runtime.CHANNELS, **variant)
        print(f"{name}: {args.directory / f'{name}.o'} ({time.perf_counter() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
