"""One sequence through engine.model.forward (which runs a batch of them), with the chunking loop the
scheduler owns: what the tests of the forward pass call."""

from __future__ import annotations

import numpy as np

from kawai.engine.model import Chunk, forward as forward_batch
from kawai.engine.scheduler import CHUNK


def forward(cfg, weights, tokens, cache, *, all_logits=False, chunk=CHUNK, positions=None, embeddings=None,
            embedding_rows=None) -> np.ndarray:
    """Run tokens (n,) after the cache's contents, `chunk` rows per call; logits (n, V) with all_logits,
    else (1, V) of the last token. positions (n,) or (3, n) and image embeddings go with their rows."""
    tokens = np.asarray(tokens)
    rows = []
    for lo in range(0, max(1, tokens.shape[0]), chunk):
        hi = lo + chunk
        pos = None if positions is None else np.asarray(positions)[..., lo:hi]
        emb = sel = None
        if embeddings is not None:
            mask = (np.asarray(embedding_rows) >= lo) & (np.asarray(embedding_rows) < hi)
            if mask.any():
                first = int((np.asarray(embedding_rows) < lo).sum())
                sel = np.asarray(embedding_rows)[mask] - lo
                emb = np.asarray(embeddings)[first : first + sel.size]
        rows.append(forward_batch(cfg, weights, [Chunk(tokens[lo:hi], pos, emb, sel, all_logits)], [cache])[0])
    return np.concatenate(rows) if all_logits else rows[-1]
