"""Worker: for each model config, build a tiny GPT at the launched TP size (float64 weights, so
the comparison sees TP's math, not fp32 rounding), run one forward/backward on fixed tokens,
gather loss, weights and full (TP=1 layout) gradients to rank 0.

Usage: python tests/workers/tp_grads.py OUT.pt '<JSON list of ModelConfig dicts>'
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model import ModelConfig, build_gpt
from model.tp_layout import merge, split_of


def one(cfg: ModelConfig, tp: int) -> dict:
    torch.manual_seed(1234)
    model = build_gpt(cfg, params_dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(cfg.seq_length).expand_as(inputs)
    loss = model(inputs, positions, None, labels=labels).mean()
    loss.backward()
    grads, weights = {}, {}
    group = parallel_state.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        for store, t in ((grads, p.grad), (weights, p.data)):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            store[name] = merge(parts, split_of(p))
    variants = [
        type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers
    ]
    return {"loss": loss.detach(), "grads": grads, "weights": weights, "variants": variants}


def main(out: str, cfgs_json: str) -> None:
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    from model import megatron_compat

    megatron_compat.install()
    results = [one(ModelConfig(**c), tp) for c in json.loads(cfgs_json)]
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
