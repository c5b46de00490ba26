"""The train step's batch, and the one path from host rows to it.

Layout: row i is one sequence, `tokens = [prompt (P, left-padded) | response (R)]`, rows
prompt-major in groups of G (row q * G + j is response j of prompt q), as the sampler emits
them. Everything the step needs per sequence (advantage, success rate, hard flag, exploration
flag) or per token (the optional importance weight) is computed on the host (ALGORITHMS.md
sections 2, 5, 7, 8) and enters the step as arrays; every field has the batch as its leading
axis, so one batch sharding places them all (None fields are absent leaves).

    batch = to_device(rows, sharding, hosts=hosts, tau_hard=..., explore_is_cap=...)

is how the scorer and the trainer both get their batches (`TrainStep.device_batch`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from uecjax.models.config import VLConfig
from uecjax.models.vision import VisionLayout
from uecjax.packing import Packing, pack
from uecjax.parallel.hosts import Hosts
from uecjax.rows import Rows
from uecjax.vision_inputs import DEFAULT_PATCH_BUCKETS, row_patches, vision_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: jax.Array  # [B, P + R] int32
    attention_mask: jax.Array  # [B, P + R] int32, 1 on real prompt and response tokens
    # [B, P + R] int32 position ids (count real tokens from 0); with images [B, 3, P + R],
    # M-RoPE's (temporal, height, width) positions, batch-major so they shard and split into
    # micro-batches along the batch axis like every other field.
    positions: jax.Array
    response_mask: jax.Array  # [B, R] float32, 1 on response tokens that carry loss
    advantages: jax.Array  # [B] sequence advantages, or [B, R] per token
    success_rate: jax.Array  # [B] float32, p_q of the sequence's prompt (higher = easier)
    is_hard: jax.Array  # [B] float32, 1 where p_q <= tau_hard
    old_logp: jax.Array | None = None  # [B, R] log pi_old at temperature 1 (compute_logprobs)
    old_entropy: jax.Array | None = None  # [B, R] entropy under pi_old (same pass)
    ref_logp: jax.Array | None = None  # [B, R] log pi_ref; None when beta == 0
    sampler_logp: jax.Array | None = None  # [B, R] the sampler's own log-probs (parity metric)
    # [B] float32, 1 on UEC's exploration rows (section 8: sampled at T' for hard prompts),
    # 0 on regular and padding rows; None = no exploration rows (hand-made batches).
    explore: jax.Array | None = None
    # [B, R] float32 per-token weight of the policy loss: the truncated importance weight
    # min(pi_1 / pi_T', C) on exploration rows' response tokens, 1 elsewhere (section 8's
    # switch, `host_batch(explore_is_cap=C)`); None = all ones (no correction, the default).
    token_weight: jax.Array | None = None
    # Images (Qwen2.5-VL), each row its own, padded to a patch bucket N
    # (`uecjax.vision_inputs.vision_rows`); None for text batches.
    pixel_values: jax.Array | None = None  # [B, N, patch_dim] float32
    vision: VisionLayout | None = None  # per-row patch layouts, leading axis B
    # The packed layout of the forward pass (`uecjax.packing`, train.pack); None: padded rows.
    # Its packed-row arrays lead with blocks x packed rows, which the batch sharding splits too.
    packing: Packing | None = None

    @property
    def images(self):
        """(pixel_values, vision) for `Qwen2_5_VL.embed_rows`, or None for text."""
        return None if self.pixel_values is None else (self.pixel_values, self.vision)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.response_len

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)


def positions_from_mask(mask) -> np.ndarray:
    """Position ids counting real tokens from 0 (left padding), as uecjax.models.default_positions."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def sequence_inputs(tokens, mask, prompt_len: int, images=None, vl_config: VLConfig | None = None,
                    patch_buckets=DEFAULT_PATCH_BUCKETS, min_patches: int = 0) -> dict:
    """The Batch fields that depend on where the sequences' images are: positions, and with
    images (pixel_values [B, N', patch_dim], image_grid_thw [B, K, 3] per row, as
    `uecjax.vision_inputs.stack_images` stores them; the images in the first prompt_len
    columns) M-RoPE positions, padded pixel_values and the per-row patch layouts (patches padded to a
    bucket of at least min_patches)."""
    if images is None:
        return dict(positions=positions_from_mask(mask))
    if vl_config is None:
        raise ValueError("rows with images need the model's VLConfig (model.config of a "
                         "Qwen2_5_VL) to lay out their patches and M-RoPE positions")
    rows = vision_rows(tokens, mask, *images, vl_config, patch_buckets, prompt_len=prompt_len,
                       min_patches=min_patches)
    return dict(positions=rows.positions, pixel_values=rows.pixel_values, vision=rows.layouts)


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """How `host_batch` packs (`uecjax.packing.pack`): tokens per packed row (0: the rows'
    length), the batch shards and micro-batches whose blocks pack separately."""

    tokens_per_row: int = 0
    shards: int = 1
    micro_batches: int = 1
    agree: object = None  # with several row shares: their collective (`uecjax.packing.pack`)


def host_batch(rows: Rows, tau_hard: float = 0.0, vl_config: VLConfig | None = None,
               min_patches: int = 0, *, explore_is_cap: float = 0.0,
               pack_spec: PackSpec | None = None) -> Batch:
    """The train step's Batch of `rows`, as numpy; rows with images need the model's VLConfig
    (positions and patch layouts are computed here, with at least min_patches patches).

    `explore` is always set (1 on exploration rows). explore_is_cap C > 0 also sets
    `token_weight`, the truncated importance weight min(pi_1 / pi_T', C) on exploration
    rows' response tokens (`Rows.importance_weight`), section 8's switch; C = 0: None.
    pack_spec: also lay out the packed forward pass (`Batch.packing`).
    """
    mask = np.concatenate([rows.prompt_mask, rows.response_mask.astype(np.int32)], axis=1)
    tokens = np.concatenate([rows.prompt_tokens, rows.response_tokens], axis=1)
    images = None if rows.pixel_values is None else (rows.pixel_values, rows.image_grid_thw)
    return Batch(
        tokens=tokens,
        attention_mask=mask,
        **sequence_inputs(tokens, mask, rows.prompt_tokens.shape[1], images, vl_config,
                          min_patches=min_patches),
        response_mask=rows.response_mask.astype(np.float32),
        advantages=rows.advantage.astype(np.float32),
        success_rate=rows.success_rate.astype(np.float32),
        is_hard=(rows.success_rate <= tau_hard).astype(np.float32),
        old_logp=rows.old_logp, old_entropy=rows.old_entropy, ref_logp=rows.ref_logp,
        sampler_logp=rows.sampler_logp, explore=rows.explore.astype(np.float32),
        token_weight=rows.importance_weight(explore_is_cap) if explore_is_cap > 0 else None,
        packing=None if pack_spec is None else pack(
            mask, rows.response_tokens.shape[1], tokens_per_row=pack_spec.tokens_per_row,
            shards=pack_spec.shards, micro_batches=pack_spec.micro_batches, agree=pack_spec.agree))


def to_device(rows: Rows, sharding, *, hosts: Hosts = Hosts(), vl_config: VLConfig | None = None,
              tau_hard: float = 0.0, explore_is_cap: float = 0.0,
              pack_spec: PackSpec | None = None) -> Batch:
    """This process's rows -> the global batch (`hosts.put`: the shares' rows in block order).

    With several shares a VL batch always has image arrays (a share's rows may have none), of
    one patch width agreed between the shares (a collective: every share calls).
    """
    patches = 0
    if vl_config is not None and hosts.count > 1:
        if rows.pixel_values is None:
            rows = dataclasses.replace(
                rows, pixel_values=np.zeros((len(rows), 0, vl_config.vision.patch_dim), np.float32),
                image_grid_thw=np.zeros((len(rows), 1, 3), np.int32))
        patches = max(hosts.gather(row_patches(rows.image_grid_thw)))
    local_spec = pack_spec
    if pack_spec is not None and hosts.count > 1:
        # Each share holds whole shards' rows (`Hosts.block`): it packs them alone, with the
        # packed row count all shares agree on; its packed rows are its block of the global ones.
        if pack_spec.shards % hosts.count:
            raise ValueError(f"train.pack: {pack_spec.shards} batch shards do not split over "
                             f"{hosts.count} row shares")
        local_spec = dataclasses.replace(pack_spec, shards=pack_spec.shards // hosts.count,
                                         agree=hosts.gather)
    batch = host_batch(rows, tau_hard, vl_config, patches, explore_is_cap=explore_is_cap,
                       pack_spec=local_spec)
    if batch.packing is not None:  # the device code sees every share's blocks
        batch = batch.replace(packing=dataclasses.replace(batch.packing, shards=pack_spec.shards))
    return hosts.put(batch, sharding)
