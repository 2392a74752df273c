"""Language-modelling loss by position: how well a model predicts held-out documents' tokens in each range of
positions. A model that handles long inputs predicts tokens far into a document as well as those near its start;
long-context activation is what brings the far ranges down.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kimivl.model.target_logprobs import target_logprobs

EDGES = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@torch.no_grad()
def position_loss(model, processor, texts: Iterable[str], edges: tuple[int, ...] = EDGES) -> dict[str, float]:
    """Mean next-token loss (nats) over ``texts``, each encoded as a plain document and cut to the model's context
    (what lies past it is never tokenized), of the tokens at positions ``[edges[i], edges[i + 1])``, keyed
    ``"<start>-<end>"`` (tokens outside every range count in none); ranges that no document reaches are left out.
    Logits are never held for a whole document (``target_logprobs``)."""
    context = model.config.text_config.max_position_embeddings
    total, count = torch.zeros(len(edges) - 1, dtype=torch.float64), torch.zeros(len(edges) - 1, dtype=torch.int64)
    device = next(model.parameters()).device
    for text in texts:
        ids = torch.tensor([processor.encode_text(text, limit=context).input_ids], device=device)
        hidden = model(input_ids=ids, return_logits=False).hidden_states[0, :-1]
        nll = -target_logprobs(hidden, model.language_model.lm_head, ids[0, 1:]).double().cpu()
        positions = torch.arange(1, ids.shape[1])  # the position of each predicted token
        bucket = torch.bucketize(positions, torch.tensor(edges), right=True) - 1  # -1: before the first edge
        keep = (bucket >= 0) & (bucket < len(edges) - 1)
        total.index_add_(0, bucket[keep], nll[keep])
        count.index_add_(0, bucket[keep], torch.ones_like(bucket[keep]))
    return {f"{edges[i]}-{edges[i + 1]}": (total[i] / count[i]).item() for i in range(len(edges) - 1) if count[i]}
