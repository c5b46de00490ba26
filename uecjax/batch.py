"""The train step's batch: fixed-shape arrays, and the host-side builder from sampler output.

Layout: row i is one sequence, `tokens = [prompt (P, left-padded) | response (R)]`, rows
prompt-major in groups of G (row q * G + j is response j of prompt q), as the sampler emits
them. Everything the step needs per sequence (advantage, difficulty, hard flag, exploration
flag) or per token (the optional importance weight) is computed on the host (ALGORITHMS.md
sections 2, 5, 7, 8) and enters the step as arrays; every field has the batch as its leading
axis, so one batch sharding places them all (None fields are absent leaves).

    batch = build_batch(sampler_out, rewards, acc, group_size=G, hp=hp)
    old_logp, old_entropy = trainer.compute_logprobs(params, batch)
    batch = batch.replace(old_logp=old_logp, old_entropy=old_entropy)   # + ref_logp if beta > 0
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from uecjax.models.config import VLConfig
from uecjax.models.vision import VisionLayout
from uecjax.objectives.advantages import group_advantages, overlong_penalty
from uecjax.objectives.entropy_control import per_sequence, success_rate
from uecjax.objectives.loss_config import LossConfig
from uecjax.vision_inputs import DEFAULT_PATCH_BUCKETS, vision_rows


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
    difficulty: jax.Array  # [B] float32 success rate p_q of the sequence's prompt
    is_hard: jax.Array  # [B] float32, 1 where p_q <= tau_hard
    old_logp: jax.Array | None = None  # [B, R] log pi_old at temperature 1 (compute_logprobs)
    old_entropy: jax.Array | None = None  # [B, R] entropy under pi_old (same pass)
    ref_logp: jax.Array | None = None  # [B, R] log pi_ref; None when beta == 0
    sampler_logp: jax.Array | None = None  # [B, R] the sampler's own log-probs (parity metric)
    # [B] float32, 1 on UEC's exploration rows (section 8: sampled at T' for hard prompts),
    # 0 on regular and padding rows; None = no exploration rows (build_batch, hand-made batches).
    explore: jax.Array | None = None
    # [B, R] float32 per-token weight of the policy loss: the truncated importance weight
    # min(pi_1 / pi_T', C) on exploration rows' response tokens, 1 elsewhere (section 8's
    # switch, `Rows.to_batch(explore_is_cap=C)`); None = all ones (no correction, the default).
    token_weight: jax.Array | None = None
    # Images (Qwen2.5-VL), each row its own, padded to a patch bucket N
    # (`uecjax.vision_inputs.vision_rows`); None for text batches.
    pixel_values: jax.Array | None = None  # [B, N, patch_dim] float32
    vision: VisionLayout | None = None  # per-row patch layouts, leading axis B

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


def informative_groups(rewards, group_size: int) -> np.ndarray:
    """DAPO dynamic sampling (section 7): True for the groups whose rewards are not all equal."""
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    return r.max(axis=1) > r.min(axis=1)


def shaped_rewards(rewards, lengths, response_budget: int, hp: LossConfig) -> np.ndarray:
    """Rewards plus DAPO's soft overlong penalty on token length when hp.overlong_buffer > 0."""
    rewards = np.asarray(rewards, np.float32)
    if hp.overlong_buffer <= 0:
        return rewards
    cache = max(1, int(round(hp.overlong_buffer * response_budget)))
    return rewards + np.asarray(overlong_penalty(lengths, response_budget, cache, hp.overlong_factor))


def build_batch(out, rewards, acc, *, group_size: int, hp: LossConfig,
                response_budget: int | None = None, images=None,
                vl_config: VLConfig | None = None) -> Batch:
    """A Batch (host numpy) from a `uecjax.sampler.SamplerOutput` and per-response rewards.

    rewards [N]: the scalar reward of each response (section 1); acc [N]: its accuracy
    component in {0, 1}, from which the difficulty is measured (section 5). N = prompts x G.
    response_budget: the generation limit for overlong shaping (default: the response width).
    images: (pixel_values, image_grid_thw) per response row (`stack_images` of each prompt's
    images repeated G times) with the model's vl_config, for a Qwen2.5-VL policy.
    The old / reference log-probs are left unset: fill them with the trainer's
    `compute_logprobs`.
    """
    n = out.response_tokens.shape[0]
    rewards, acc = np.asarray(rewards, np.float32), np.asarray(acc, np.float32)
    if rewards.shape != (n,) or acc.shape != (n,):
        raise ValueError(f"rewards {rewards.shape} and acc {acc.shape} must both be ({n},), one per response")
    if n % group_size:
        raise ValueError(f"{n} responses do not form groups of {group_size}")
    R = out.response_tokens.shape[1]
    rewards = shaped_rewards(rewards, out.response_mask.sum(axis=1), response_budget or R, hp)
    adv = np.asarray(group_advantages(rewards, group_size, hp.advantage), np.float32)
    difficulty = per_sequence(success_rate(acc.reshape(-1, group_size)), group_size)
    mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1).astype(np.int32)
    tokens = np.concatenate([out.prompt_tokens, out.response_tokens], axis=1).astype(np.int32)
    return Batch(
        tokens=tokens,
        attention_mask=mask,
        **sequence_inputs(tokens, mask, out.prompt_tokens.shape[1], images, vl_config),
        response_mask=out.response_mask.astype(np.float32),
        advantages=adv,
        difficulty=difficulty,
        is_hard=(difficulty <= hp.tau_hard).astype(np.float32),
        sampler_logp=np.asarray(out.logprobs, np.float32),
    )
