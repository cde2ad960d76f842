"""`train_mtp.py` under `torchrun --nproc_per_node 2` counting the value head's DDP all-reduces,
for tests/test_train_ranks.py.

Wraps wmtp_dist.replicate (as train_mtp imports it) so that the value head's DDP wrapper gets a
comm hook that counts its bucket all-reduces before doing the default one, runs train_mtp.main,
then prints one JSON line per rank: the rank and the count.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

import train_mtp  # noqa: E402

replicate, reduced = train_mtp.replicate, []


def counting_replicate(acc, module):
    """wmtp_dist.replicate, its wrapper's bucket all-reduces counted in `reduced`."""
    ddp = replicate(acc, module)

    def hook(state, bucket):
        reduced.append(bucket.index())
        return allreduce_hook(state, bucket)  # state None: the default process group

    ddp.register_comm_hook(None, hook)
    return ddp


def main() -> None:
    train_mtp.replicate = counting_replicate
    rank = int(os.environ["RANK"])  # set by torchrun
    train_mtp.main(sys.argv[1:])  # ends with end_distributed
    line = json.dumps({"rank": rank, "value_head_allreduces": len(reduced)}) + "\n"
    os.write(1, line.encode())  # one write: the two ranks' lines never interleave
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown after the result was printed


if __name__ == "__main__":
    main()
