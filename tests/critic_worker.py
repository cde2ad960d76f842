"""Stage 1 under `torchrun --nproc_per_node 2`, for tests/test_train_ranks.py.

Runs `train_critic` to its end with the given config, then scores the saved value head on the
held-out split from every rank; prints one JSON line per rank: the rank, the step it stopped at,
and the held-out metrics.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import io_stream  # noqa: E402
import train_critic  # noqa: E402
from wmtp_cli import parse_args  # noqa: E402
from wmtp_dist import end_distributed, make_accelerator  # noqa: E402
from wmtp_loss import ValueHead  # noqa: E402
from wmtp_train import load_base, setup  # noqa: E402


def main() -> None:
    cfg = setup(parse_args(sys.argv[1:], "critic worker", with_algo=False, with_resume=False))
    res = train_critic.train_critic(cfg)
    acc = make_accelerator(cfg)
    tokenizer, model = load_base(cfg, acc)
    model.eval().to(acc.device)
    head = ValueHead(model.config.hidden_size).to(acc.device)
    head.load_state_dict(io_stream.read_safetensors(cfg.paths.value_head))
    held = train_critic.evaluate(cfg, model, head, tokenizer, None, acc)
    line = json.dumps({"rank": acc.process_index, "steps": len(res["losses"]), **held}) + "\n"
    os.write(1, line.encode())  # one write: the two ranks' lines never interleave
    end_distributed()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown after the result was printed


if __name__ == "__main__":
    main()
