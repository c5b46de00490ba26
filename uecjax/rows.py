"""Response rows on the host: one row per sampled response, fixed widths, and FIFO buffers.

Rollouts produce rows round by round (a group of G per prompt, exploration groups, refills);
the train step needs a fixed number of them. `Rows` holds them as numpy arrays of fixed
prompt width P and response width R so that any selection of rows stacks into a batch of
the same shapes (ALGORITHMS.md section 8: "static shapes: the jitted step always sees the
same batch size").
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


@dataclasses.dataclass
class Rows:
    prompt_tokens: np.ndarray  # [n, P] int32, left-padded
    prompt_mask: np.ndarray  # [n, P] int32
    response_tokens: np.ndarray  # [n, R] int32
    response_mask: np.ndarray  # [n, R] float32
    sampler_logp: np.ndarray  # [n, R] float32, the sampler's log-probs
    old_logp: np.ndarray | None  # [n, R] float32, log pi_old at temperature 1 (trainer);
    old_entropy: np.ndarray | None  # [n, R] float32    None until the rows are scored
    ref_logp: np.ndarray | None  # [n, R] float32, or None when beta == 0
    advantage: np.ndarray  # [n] float32
    success_rate: np.ndarray  # [n] float32, p_q of the row's prompt (padding rows: 1)
    reward: np.ndarray  # [n] float32
    accuracy: np.ndarray  # [n] float32
    truncated: np.ndarray  # [n] bool, hit the length limit
    explore: np.ndarray  # [n] bool, from UEC's exploration sampling (section 8)
    # The prompt's images (Qwen2.5-VL), as `uecjax.vision_inputs.stack_images` stores them;
    # None when no row has images.
    pixel_values: np.ndarray | None = None  # [n, N, patch_dim] float32, zero-padded
    image_grid_thw: np.ndarray | None = None  # [n, K, 3] int32, zero rows: no image

    def __len__(self) -> int:
        return self.prompt_tokens.shape[0]

    def select(self, index) -> "Rows":
        return Rows(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                       for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        parts = [p for p in parts if p is not None]
        fields = {f.name: None if getattr(parts[0], f.name) is None else
                  np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(Rows) if f.name not in IMAGE_FIELDS}
        return Rows(**fields, **_concat_images(parts))

    @staticmethod
    def from_sampler(out, prompt_width: int, pixel_values=None, image_grid_thw=None) -> "Rows":
        """Unscored, ungraded rows of a `uecjax.sampler.SamplerOutput`, prompts re-padded to
        prompt_width; pixel_values / image_grid_thw: each row's images (`stack_images`).
        Rewards, advantages and success rates are zeros, the log-probs None, until set."""
        tokens, mask = left_pad(out.prompt_tokens, out.prompt_mask, prompt_width)
        n = len(tokens)
        zeros = np.zeros(n, np.float32)
        return Rows(prompt_tokens=tokens, prompt_mask=mask, response_tokens=out.response_tokens,
                    response_mask=out.response_mask.astype(np.float32),
                    sampler_logp=out.logprobs, old_logp=None, old_entropy=None, ref_logp=None,
                    advantage=zeros, success_rate=zeros, reward=zeros, accuracy=zeros,
                    truncated=np.asarray(out.truncated).astype(bool), explore=np.zeros(n, bool),
                    pixel_values=pixel_values, image_grid_thw=image_grid_thw)

    @staticmethod
    def empty(n: int, prompt_width: int, response_width: int, with_ref: bool) -> "Rows":
        """n padding rows: no prompt, no response, zero weight in every aggregate."""
        z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
        return Rows(
            prompt_tokens=np.zeros((n, prompt_width), np.int32),
            prompt_mask=np.zeros((n, prompt_width), np.int32),
            response_tokens=np.zeros((n, response_width), np.int32),
            response_mask=z(n, response_width), sampler_logp=z(n, response_width),
            old_logp=z(n, response_width), old_entropy=z(n, response_width),
            ref_logp=z(n, response_width) if with_ref else None,
            advantage=z(n), success_rate=np.ones(n, np.float32), reward=z(n), accuracy=z(n),
            truncated=np.zeros(n, bool), explore=np.zeros(n, bool))

    def importance_weight(self, cap: float) -> np.ndarray:
        """[n, R] float32: min(exp(old_logp - sampler_logp), cap) on exploration rows'
        response tokens, 1 elsewhere. old_logp is pi_1 (the trainer, temperature 1) and
        sampler_logp pi_T' (the temperature-scaled distribution the row was sampled from)."""
        if cap <= 0:
            raise ValueError(f"explore_is_cap={cap}: the truncation needs C > 0")
        where = self.explore[:, None] & (self.response_mask > 0)
        # min(exp(d), C) = exp(min(d, log C)): no overflow for large d. Off the selected
        # tokens the difference is discarded (the sampler's values there may be anything).
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(where, self.old_logp.astype(np.float32) - self.sampler_logp.astype(np.float32), 0.0)
        weight = np.exp(np.minimum(d, np.float32(np.log(cap))))
        return np.where(where, weight, 1.0).astype(np.float32)


def _concat_images(parts: list[Rows]) -> dict:
    """The image fields of concatenated rows: each part's arrays zero-padded to the widest
    (patches N, images K); parts without images get zero rows (no image)."""
    having = [p for p in parts if p.pixel_values is not None]
    if not having:
        return dict(pixel_values=None, image_grid_thw=None)
    N = max(p.pixel_values.shape[1] for p in having)
    K = max(p.image_grid_thw.shape[1] for p in having)
    D = having[0].pixel_values.shape[2]
    pixels, grids = [], []
    for p in parts:
        if p.pixel_values is None:
            pixels.append(np.zeros((len(p), N, D), np.float32))
            grids.append(np.zeros((len(p), K, 3), np.int32))
        else:
            pixels.append(np.pad(p.pixel_values, ((0, 0), (0, N - p.pixel_values.shape[1]), (0, 0))))
            grids.append(np.pad(p.image_grid_thw, ((0, 0), (0, K - p.image_grid_thw.shape[1]), (0, 0))))
    return dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.concatenate(grids))


def left_pad(tokens: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-pads left-padded [n, P'] prompts to width P >= every row's length."""
    n, current = tokens.shape
    if current > width:
        if mask[:, : current - width].any():
            raise ValueError(f"a prompt is longer than the batch's prompt width {width}")
        return tokens[:, current - width:], mask[:, current - width:]
    pad = width - current
    return (np.pad(tokens, ((0, 0), (pad, 0))), np.pad(mask, ((0, 0), (pad, 0))))


class RowBuffer:
    """FIFO of rows with an optional capacity (oldest rows fall out first)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.rows: Rows | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    def push(self, rows: Rows) -> None:
        if len(rows) == 0:
            return
        self.rows = rows if self.rows is None else Rows.concat([self.rows, rows])
        if self.capacity is not None and len(self.rows) > self.capacity:
            self.rows = self.rows.select(slice(len(self.rows) - self.capacity, None))

    def pop(self, n: int) -> Rows | None:
        """The n oldest rows (fewer if fewer are held; None if none), removed from the buffer."""
        if len(self) == 0:
            return None
        taken = self.rows.select(slice(0, n))
        self.rows = self.rows.select(slice(n, None))
        return taken

    def sample(self, n: int, rng: np.random.Generator) -> Rows:
        """n rows drawn uniformly without replacement (kept in the buffer)."""
        return self.rows.select(np.sort(rng.choice(len(self), size=n, replace=False)))

    def state(self) -> dict | None:
        """Arrays for the checkpoint (None when empty)."""
        if self.rows is None or len(self.rows) == 0:
            return None
        return {f.name: getattr(self.rows, f.name) for f in dataclasses.fields(Rows)
                if getattr(self.rows, f.name) is not None}

    def load(self, state: dict | None) -> None:
        if not state:
            self.rows = None
            return
        fields = {f.name: state.get(f.name) for f in dataclasses.fields(Rows)}
        self.rows = Rows(**fields)
