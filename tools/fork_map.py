"""map() over forked worker processes, for the compile tools (compile_flash, compile_gluon, compile_warp_spec).

    for result in fork_map(compile_one, range(len(jobs)), workers=2):  # in order, each as soon as it is ready
        ...

Compiling one kernel for sm_90a is single-threaded Python and LLVM that
holds the GIL (threads gain nothing), so the tools compile one kernel per
process. The workers are forked: they inherit the imported modules and the
jobs' functions, so `fn` and `items` need only be picklable by name (a
module-level function and, say, job indices). Triton's on-disk cache is
shared by the workers as by separate runs.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator


def fork_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for each item, in order; in `workers` forked processes, or here when one would do."""
    items = list(items)
    if workers <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(fn, items)
