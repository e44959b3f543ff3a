"""A twicing-lm checkpoint as an lm-evaluation-harness model, registered as ``twicing``.

``lm_eval --model twicing --model_args checkpoint=RUN[,tag=T,batch_size=B,max_length=L] ...`` or
``python -m pretrain.lm_eval``. Any variant, any saved TP size (merged; one process at TP=1, or
TP = the world size under a launcher, every rank scoring every request).

Tokenisation is lm-eval's ``hf`` model's, so numbers compare with ``--model hf`` on an export
(``pretrain.export_hf``): this is a ``TemplateLM``, whose ``loglikelihood`` splits a request the
way the ``hf`` model does (trailing context spaces move to the continuation; the continuation's
ids are those of ``encode(context + continuation)`` after ``encode(context)``), with ids
``sentencepiece.encode(text)`` (the export's ``tokenizer.json`` reproduces them) and no leading
token; an empty context — and the first rolling window of ``loglikelihood_rolling`` — is
conditioned on ``prefix_token_id``, the end-of-document token (pass ``prefix_token_id=<eod>`` to
the ``hf`` model when the tokenizer also has a BOS). Inputs longer than ``max_length`` (the
training sequence length) lose tokens on the left, as in ``hf``. Log-probabilities are over the
padded vocabulary (what the model's softmax normalises, and what the export's logits hold).

``generate_until`` decodes with the incremental decoder behind ``pretrain.generate`` (per-layer
caches, twicing's O1 cache): the prompt is ``encode(context)`` (``[eod]`` when empty), greedy
unless ``do_sample``; the new ids are decoded on their own (as the ``hf`` model does, so a
leading space is dropped) and cut at the first ``until`` string.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

NAME = "twicing"


def _parallel(init) -> tuple[int, int]:
    """``(rank, TP size)``: the process group already set up, else ``init()`` (TP = world)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return dist.get_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return init()


@register_model(NAME)
class TwicingLM(TemplateLM):
    """lm-eval ``LM`` over a twicing-lm checkpoint (``checkpoint`` as ``pretrain.evaluate``)."""

    def __init__(
        self,
        checkpoint: str,
        tag: str | None = None,
        tokenizer: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        from data_prep.base.errors import ConfigError
        from pretrain.checkpoint.load_model import load_model
        from pretrain.checkpoint.reader import open_checkpoint
        from pretrain.parallel.distributed import init_for_inference

        self.ck = open_checkpoint(str(checkpoint), tag, tokenizer)
        self.tok = self.ck.tokenizer
        try:  # lm-eval's CLI passes None or "auto" when --batch_size is not a number
            self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
        except ValueError:
            raise ConfigError(f"batch_size must be an integer, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
        self._max_length = int(max_length or self.ck.model.seq_length)
        if self.ck.model.position_embedding == "learned_absolute":
            self._max_length = min(self._max_length, self.ck.model.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self.global_rank, self.tp = _parallel(init_for_inference)
        self.model = load_model(self.ck, self.global_rank, self.tp)

    # ------------------------------------------------------------------ what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece:{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return list(self.tok.encode(string))

    def get_model_info(self) -> dict[str, Any]:
        m = self.ck.model
        return {
            "model_source": "twicing-lm",
            "checkpoint": str(self.ck.tag_dir),
            "step": self.ck.step,
            "attention": m.attention,
            "attention_layers": m.attention_layers,
            "tensor_parallel": self.tp,
        }

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax ``[len(row), vocab]`` of each row (right-padded into one batch)."""
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        pos = torch.arange(width).expand_as(x)
        logits = self.model(x, pos, None, runtime_gather_output=True)
        logp = F.log_softmax(logits.float(), dim=-1)
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy?)`` per ``(key, ctx_ids, cont_ids)``."""
        jobs = []
        for _key, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval request with an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            jobs.append((whole[:-1], list(continuation)[-self.max_length :]))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(jobs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, logp in zip(idx, self._logprobs([jobs[i][0] for i in idx]), strict=True):
                target = torch.tensor(jobs[i][1])
                logp = logp[-len(target) :]
                total = float(logp.gather(1, target[:, None]).sum())
                greedy = bool((logp.argmax(dim=-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text: disjoint windows of ``max_length`` tokens, each
        conditioned on the previous token (the first on ``prefix_token_id``), as ``hf``."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context with the incremental decoder; cut at the ``until`` strings."""
        from model.inference.generation import generate
        from model.inference.sampling import Sampling

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items(), key=str)), []).append(i)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = kwargs.get("temperature")
            temperature = 1.0 if temperature is None else float(temperature)
            sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            sampling = Sampling(
                temperature=temperature if sample else 0.0,
                top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
            )
            room = max(1, self.max_length - max_new)
            prompts = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0])[-room:]
                prompts.append(ids or [self.tok.eod])
            for start in range(0, len(idx), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                results = generate(
                    self.model,
                    batch,
                    max_new_tokens=max_new,
                    eod=self.tok.eod,
                    vocab_size=self.tok.vocab_size,
                    context_length=self.max_length,
                    sampling=sampling,
                    seed=int(kwargs.get("seed", 0)) + start,
                )
                for i, r in zip(idx[start:], results, strict=False):
                    text = self.tok.decode(r.token_ids)  # alone, as the hf model decodes
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
        return out  # type: ignore[return-value]
