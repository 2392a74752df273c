"""Whether a fast path may use a layer's weight in place of calling the layer.

MLA's one-token cached step (kv_b_proj absorbed into the query), the loss through the LM head (chunked, its logits
recomputed in backward) and the patch embedding (a matmul) read their layer's weight. Only a plain torch layer is
read so: a wrapper or subclass (a LoRA adapter) or a hooked layer is called instead, on the slower path, so that what
it adds is computed and its hooks run.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module


def plain_layer(layer: nn.Module, kind: type[nn.Module]) -> bool:
    """True when ``layer`` is exactly ``kind`` (not a subclass or a wrapper) and no forward or backward hook, its own
    or torch's global ones (which ``FlopCounterMode`` installs), would run were it called."""
    own = layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks
    return type(layer) is kind and not (
        own
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )
