"""One rank started by ``distloop launcher.nproc_per_node=N``: ``python -m distloop.worker CONFIG``."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from distloop.cli import worker_main

if __name__ == "__main__":
    record(worker_main)(sys.argv[1])
