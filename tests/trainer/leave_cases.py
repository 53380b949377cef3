"""Run under torchrun with 2 gloo ranks: how `leave_process_group` ends a multi-rank run.

`python leave_cases.py waits OUT_DIR`: rank 1 is busy for a second before it leaves; rank 0 writes
`rank0.txt` saying whether rank 1 had got to its end before rank 0 left. Each rank then prints
"rank N left" without a newline and ends through `exit_process`.
`python leave_cases.py peer_gone OUT_DIR`: rank 1 dies; rank 0 still leaves (within its timeout)
and writes `rank0.txt`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main(case: str, out_dir: str) -> None:
    import torch.distributed as dist

    from tether.engine.fsdp_collectives import leave_process_group

    out = Path(out_dir)
    dist.init_process_group("gloo")
    dist.barrier()
    rank = dist.get_rank()
    if case == "waits":
        if rank == 1:
            time.sleep(1.0)
            (out / "rank1_done").write_text("done")
        leave_process_group(together=True)
        if rank == 0:
            (out / "rank0.txt").write_text("waited" if (out / "rank1_done").exists() else "left first")
        print(f"rank {rank} left", end="")  # still in the buffer of a piped stdout: exit_process flushes it
    elif case == "peer_gone":
        if rank == 1:
            os._exit(0)
        start = time.monotonic()
        leave_process_group(together=True, timeout_s=20.0)
        (out / "rank0.txt").write_text(f"left after {time.monotonic() - start:.1f} s")
    else:
        raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    from tether.engine.fsdp_collectives import exit_process

    main(*sys.argv[1:])
    exit_process(0)
