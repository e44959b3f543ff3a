"""Pipeline stages of the GPT: which layers a stage holds, their global names, and what crosses
from one stage to the next.

At pipeline size 1 everything here is the identity: one stage holds every layer under the names
it always had.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from model.attention.first_values import FirstLayerValues
from model.megatron_compat import OffsetModuleList, wrap_set_input_tensor

#: seeds of the streams that initialise each layer and the (untied) output layer
_LAYER_STREAM, _OUTPUT_STREAM = 1_000_003, 999_983


def stage_layers(config: TransformerConfig) -> range:
    """The global (0-based) indices of the layers this pipeline stage builds."""
    offset = get_transformer_layer_offset(config)
    return range(offset, offset + get_num_layers_to_build(config))


def layer_seed(base: int, global_layer: int) -> int:
    """The seed that initialises global layer ``global_layer`` (1-based) of a run seeded ``base``:
    one stream per layer, so every pipeline layout builds the same weights."""
    return (base * _LAYER_STREAM + global_layer) % 2**63


def output_seed(base: int) -> int:
    """The seed of the untied output layer's initialisation."""
    return (base * _OUTPUT_STREAM + 1) % 2**63


def use_global_layer_names(model: torch.nn.Module, offset: int) -> None:
    """Rename ``model.decoder.layers`` to global indices (a no-op on the first stage)."""
    if offset:
        model.decoder.layers = OffsetModuleList(list(model.decoder.layers), offset)


class FirstValuesTransport:
    """Carries layer 0's values V¹ to later stages inside the one tensor a stage sends:
    ``[hidden | V¹]`` of shape ``[s, b, hidden + width]`` (``width`` = this rank's value heads ×
    head dim). One tensor because megatron's schedule back-propagates only the first output;
    gradients reach layer 0's value projection through the concatenation.

    With sequence parallelism (``fold`` = the TP size) the hidden states that cross are this TP
    rank's ``s/TP`` slice of the sequence, while V¹ covers the whole (local) sequence for this
    rank's heads: V¹ is sent whole, its ``TP`` sequence slices side by side in the feature
    dimension (``width`` = ``TP`` × heads × head dim), and unfolded on arrival. Sending only the
    slice would lose the other positions of this rank's heads, which no other rank holds."""

    def __init__(
        self,
        holder: FirstLayerValues,
        hidden_size: int,
        groups: int,
        head_dim: int,
        fold: int = 1,
    ) -> None:
        self.holder, self.hidden_size, self.head_dim = holder, hidden_size, head_dim
        self.fold = fold
        self.width = groups * head_dim * fold

    def attach(self, model: torch.nn.Module) -> None:
        if not model.pre_process:
            wrap_set_input_tensor(model, self._receive)
        if not model.post_process:
            model.register_forward_hook(self._append)

    def _receive(self, set_decoder_input, tensor) -> None:
        """Split what the previous stage sent into the hidden states and V¹."""
        if isinstance(tensor, list):
            (tensor,) = tensor
        if tensor is None:
            set_decoder_input(tensor)
            return
        hidden, values = tensor.split([self.hidden_size, self.width], dim=-1)
        s, b = values.shape[:2]
        if self.fold > 1:  # [s/TP, b, TP·w] → [s, b, w]
            values = values.reshape(s, b, self.fold, -1).permute(2, 0, 1, 3)
            s = s * self.fold
        self.holder.arrive(values.reshape(s, b, -1, self.head_dim).transpose(0, 1))
        set_decoder_input(hidden)

    def _append(self, _module, _args, hidden: torch.Tensor) -> torch.Tensor:
        v = self.holder.get().transpose(0, 1)  # [s, b, groups, head_dim]
        s, b = v.shape[:2]
        if self.fold > 1:  # [s, b, w] → [s/TP, b, TP·w]
            v = v.reshape(self.fold, s // self.fold, b, -1).permute(1, 2, 0, 3)
        return torch.cat([hidden, v.reshape(*hidden.shape[:2], -1)], dim=-1)

    def adjust_shapes(self, recv: list, send: list) -> tuple[list, list]:
        """For the schedule: every tensor between stages is ``width`` wider."""

        def wider(shapes):
            return [(*shape[:-1], shape[-1] + self.width) for shape in shapes]

        return wider(recv), wider(send)


def stage_of_parameter(name: str, num_layers: int, pp: int) -> int:
    """The pipeline stage (of ``pp``) that holds parameter ``name`` of the whole model (global
    names): a layer's stage, the embedding's the first, the final norm's and the output layer's
    the last (a tied embedding's copy there is not a parameter of the PP=1 model)."""
    if name.startswith("decoder.layers."):
        return int(name.split(".")[2]) // (num_layers // pp)
    if name.startswith("embedding."):
        return 0
    return pp - 1
