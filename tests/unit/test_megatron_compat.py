"""What ``model.megatron_compat`` relies on in megatron-core and torch, checked against the
installed versions: an upgrade that changes any of it fails here, loudly (a patch that is no
longer needed fails too, so it can be removed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import megatron.core
import pytest
import torch

from model import megatron_compat as compat

from launch import ROOT


def test_the_checked_megatron_release():
    assert megatron.core.__version__.startswith("0.16."), (
        f"megatron-core {megatron.core.__version__}: re-verify every assumption in "
        "model/megatron_compat.py, then update this"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are no-ops with CUDA")
def test_the_process_wide_patches_are_needed_and_work():
    """In a fresh interpreter (the patches are process-wide): before ``install()`` megatron's
    RoPE and the pipeline schedules' token counter fail on a CPU-only torch; after it they run
    on the CPU, and megatron's RNG tracker accessor returns the CPU tracker."""
    script = textwrap.dedent(
        """
        import torch
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.tensor_parallel import random as mp_random
        from model import megatron_compat as compat

        def rope():
            return RotaryEmbedding(kv_channels=8, rotary_percent=1.0,
                                   use_cpu_initialization=False)(16)

        def counter():
            return schedules.torch.zeros([], dtype=torch.int, device="cuda")

        failed = []
        for name, fn in (("rope", rope), ("counter", counter)):
            try:
                fn()
            except (AssertionError, RuntimeError):
                failed.append(name)
        assert failed == ["rope", "counter"], f"needed no patch: {failed}"
        assert schedules.torch is torch and not compat.installed()
        compat.install()
        compat.install()  # idempotent
        assert compat.installed() and torch.cuda.current_device() == torch.device("cpu")
        assert rope().device.type == "cpu" and counter().device.type == "cpu"
        tracker = compat.install_cpu_rng_tracker()
        assert mp_random.get_cuda_rng_tracker() is tracker
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_megatron_sources_still_make_the_calls_we_patch():
    """The call sites each patch exists for (when one disappears, the patch can go)."""
    import inspect

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    assert 'device="cuda"' in inspect.getsource(schedules)
    assert ".cuda()" in inspect.getsource(LanguageModule.setup_embeddings_and_output_layer)
    for name in compat.RNG_TRACKER_GLOBALS:
        assert hasattr(mp_random, name), name
    assert "_CUDA_RNG_STATE_TRACKER" in inspect.getsource(mp_random.get_cuda_rng_tracker)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA tensors move for real")
def test_tensor_cuda_is_the_identity_only_inside_the_block():
    x = torch.ones(2)
    with compat.tensor_cuda_is_identity():
        assert x.cuda() is x
    with pytest.raises((AssertionError, RuntimeError)):
        x.cuda()


def test_offset_module_list_names_globally_and_indexes_locally():
    """torch's ``ModuleList`` turns an index into a key through the private
    ``_get_abs_string_index`` we override: indexing, iteration and names must all agree."""
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    layers = compat.OffsetModuleList([a, b], offset=6)
    assert layers[0] is a and layers[1] is b and layers[-1] is b and list(layers) == [a, b]
    assert len(layers) == 2 and [n for n, _ in layers.named_children()] == ["6", "7"]
    assert sorted(layers.state_dict()) == ["6.bias", "6.weight", "7.bias", "7.weight"]
    with pytest.raises(IndexError):
        layers[2]


def test_megatron_schedules_call_the_wrapped_set_input_tensor(one_rank):
    """The schedule looks ``set_input_tensor`` up on the model instance
    (``get_attr_wrapped_model``), so the wrapper is what receives the previous stage's tensor."""
    import inspect

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.utils import get_attr_wrapped_model

    received = []

    class Stage(torch.nn.Module):
        def set_input_tensor(self, tensor):
            received.append(("original", tensor))

    stage = Stage()
    compat.wrap_set_input_tensor(stage, lambda original, t: original(t * 2))
    get_attr_wrapped_model(stage, "set_input_tensor")(torch.ones(1))
    assert received and received[0][0] == "original" and received[0][1].item() == 2.0
    assert 'get_attr_wrapped_model(model, "set_input_tensor")' in inspect.getsource(
        schedules.forward_step
    )


def test_megatron_tags_sequence_parallel_parameters(one_rank):
    """Under sequence parallelism megatron tags the parameters whose gradients are partial per
    TP rank (RowParallelLinear's bias; our norms do the same): what ``is_sequence_parallel``
    reads."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from model.norm import Norm

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True
    )
    config.sequence_parallel = True  # TP 1 refuses it in the constructor; the layers read it
    linear = RowParallelLinear(
        8, 8, config=config, init_method=torch.nn.init.zeros_, bias=True,
        input_is_parallel=True, skip_bias_add=False,
    )  # fmt: skip
    assert compat.is_sequence_parallel(linear.bias)
    assert not compat.is_sequence_parallel(linear.weight)
    assert all(compat.is_sequence_parallel(p) for p in Norm(config, 8).parameters())
    config.sequence_parallel = False
    assert not any(compat.is_sequence_parallel(p) for p in Norm(config, 8).parameters())
