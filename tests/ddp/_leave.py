"""How a torchrun worker ends: after a barrier (every rank's results are written), without
gloo's teardown. Destroying the process group aborted a rank now and then ("terminate
called without an active exception"), most often after collectives that a case abandons
by raising; the launcher's retries hid it at the cost of whole reruns."""

import os
import sys

import torch.distributed as dist


def leave() -> None:
    """Wait for every rank, flush the output streams and exit with status 0."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
