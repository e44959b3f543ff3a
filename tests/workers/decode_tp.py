"""Worker: at the launched TP size, every decoding case's relative errors against the full
forward (``decoding_cases.check_case``); rank 0 writes them as JSON.

Usage: python tests/workers/decode_tp.py OUT.json
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: decoding_cases

from decoding_cases import CASES, check_case  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    from model import megatron_compat

    megatron_compat.install()
    errors = {name: check_case(name) for name in CASES}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(errors))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
