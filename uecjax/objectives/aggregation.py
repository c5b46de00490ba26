"""Aggregation of per-token quantities over a batch (ALGORITHMS.md section 4)."""

import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def batch_counts(mask):
    """(number of valid tokens, number of non-empty sequences) of mask [B, T], float32 (section 4).

    Compute these on the whole global batch and pass them to `aggregate` for every micro-batch:
    the sum of the micro-batch aggregates then equals the aggregate of the global batch.
    """
    mask = mask.astype(jnp.float32)
    return mask.sum(), (mask.sum(axis=-1) > 0).sum().astype(jnp.float32)


def aggregate(x, mask, mode: str = "token-mean", *, global_token_count=None, global_seq_count=None,
              max_len=None):
    """Reduce per-token x [B, T] under mask [B, T] to a float32 scalar (section 4).

    token-mean:              sum(m x) / N_tokens
    seq-mean-token-mean:     sum_i [sum_t m x / sum_t m] / N_seqs
    seq-mean-token-sum:      sum_i [sum_t m x] / N_seqs
    seq-mean-token-sum-norm: sum_i [sum_t m x / max_len] / N_seqs   (max_len default T)
    N_tokens / N_seqs are the global batch's counts (see `batch_counts`) when given, else those
    of this batch (N_seqs counts sequences with at least one valid token). Empty rows and empty
    batches contribute 0, never NaN.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}, expected one of {AGG_MODES}")
    mask = mask.astype(jnp.float32)
    xm = jnp.where(mask > 0, x.astype(jnp.float32), 0.0)  # where, not *, so NaN/inf off-mask stays out
    local_tokens, local_seqs = batch_counts(mask)
    if mode == "token-mean":
        n_tok = local_tokens if global_token_count is None else global_token_count
        return xm.sum() / jnp.maximum(n_tok, 1.0)
    per_seq = xm.sum(axis=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / jnp.maximum(mask.sum(axis=-1), 1.0)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / (x.shape[-1] if max_len is None else max_len)
    n_seq = local_seqs if global_seq_count is None else global_seq_count
    return per_seq.sum() / jnp.maximum(n_seq, 1.0)
