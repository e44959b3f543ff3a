"""Worker: build each model config at the launched TP × PP layout from one seed and save this
rank's stage weights (global names) with its TP layout, for the test to merge.

Usage: python tests/workers/pp_init.py OUT_DIR TP PP '<JSON list of ModelConfig dicts>'
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model import ModelConfig, build_gpt
from model.tp_layout import split_of


def main(out: str, tp: str, pp: str, cfgs_json: str) -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=int(tp), pipeline_model_parallel_size=int(pp)
    )
    from model import megatron_compat

    megatron_compat.install()
    results = []
    for c in json.loads(cfgs_json):
        torch.manual_seed(1234)
        model = build_gpt(ModelConfig(**c))
        results.append(
            {
                "weights": {
                    k: v.detach().clone()
                    for k, v in model.state_dict().items()
                    if not k.endswith("_extra_state")
                },
                "layout": {k: split_of(p) for k, p in model.named_parameters()},
                "layers": [layer.layer_number for layer in model.decoder.layers],
            }
        )
    rank = dist.get_rank()
    torch.save(
        {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "results": results,
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
