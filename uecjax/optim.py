"""The optimizer of the train step: global-norm clipping, then AdamW on a schedule.

    optimizer = make_optimizer(OptimConfig(learning_rate=1e-6), external_lr=True)

Weight decay applies to matrices only (not norms or biases). Frozen groups
(`OptimConfig.frozen`, e.g. ("visual",)) take no update, no weight decay and no Adam moments.
Updates are computed in float32; the moments are stored in `state_dtype` and the parameters
cast back to their storage dtype. With bfloat16 parameters an update much smaller than 2^-8 of
a weight rounds away (most of a step at learning rates around 1e-6); float32 parameters with
bfloat16 moments save a third of the memory without that loss. docs/DESIGN.md, "Updates per
rollout, controller, optimizer".
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("constant", "warmup_cosine", "linear")
STATE_DTYPES = ("", "float32", "bfloat16")


class OptimConfigError(ValueError):
    """An optimizer setting out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6  # peak learning rate
    schedule: str = "constant"  # constant | warmup_cosine | linear (all with linear warmup)
    warmup_steps: int = 0
    total_steps: int = 1000  # decay horizon of warmup_cosine / linear, warmup included
    end_lr_ratio: float = 0.0  # final lr / peak lr of warmup_cosine / linear
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables it
    # Top-level parameter groups that do not train: names of the model's attributes, e.g.
    # ("visual",) for the vision tower of uecjax.models.Qwen2_5_VL.
    frozen: tuple[str, ...] = ()
    state_dtype: str = ""  # Adam moments: "" (the parameters' dtype), float32 or bfloat16

    def __post_init__(self):
        def bad(field, why):
            raise OptimConfigError(f"OptimConfig.{field}={getattr(self, field)!r}: {why}")

        if self.schedule not in SCHEDULES:
            bad("schedule", f"expected one of {SCHEDULES}")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            bad("total_steps", f"must exceed warmup_steps={self.warmup_steps} for a decaying schedule")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            bad("end_lr_ratio", "must be in [0, 1]")
        for field in ("b1", "b2"):
            if not 0.0 <= getattr(self, field) < 1.0:
                bad(field, "must be in [0, 1)")
        if self.eps <= 0:
            bad("eps", "must be > 0")
        if self.state_dtype not in STATE_DTYPES:
            bad("state_dtype", f"expected one of {STATE_DTYPES} ('' = the parameters' dtype)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            bad("weight_decay" if self.weight_decay < 0 else "max_grad_norm", "must be >= 0")
        object.__setattr__(self, "frozen", tuple(self.frozen))


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate per optimizer step."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    end = lr * cfg.end_lr_ratio
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, cfg.total_steps, end)
    if cfg.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, lr, warm) if warm else optax.constant_schedule(lr)
    decay = optax.linear_schedule(lr, end, cfg.total_steps - warm)
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def decay_mask(params):
    """True on parameters that take weight decay (matrices, not norms or biases)."""
    def one(path, _):
        # The last dict key names the parameter (nnx.Variable adds a trailing `.value`).
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return not (str(name).endswith("norm") or str(name).endswith("_b"))
    return jax.tree_util.tree_map_with_path(one, params)


def _group(path) -> str:
    """The top-level group of a parameter path ('visual', 'language_model', 'layers', ...)."""
    return str([k.key for k in path if isinstance(k, jax.tree_util.DictKey)][0])


def check_frozen(params, frozen) -> None:
    """Every frozen name must be a top-level group of the params (a typo would train it)."""
    groups = {_group(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    unknown = sorted(set(frozen) - groups)
    if unknown:
        raise OptimConfigError(f"OptimConfig.frozen={tuple(frozen)!r}: {unknown} name no parameter "
                               f"group of this model; its groups are {sorted(groups)}")


def trainable_labels(params, frozen):
    """'frozen' or 'train' per parameter, for optax.multi_transform."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _group(path) in frozen else "train", params)


def stop_gradient_frozen(params, frozen):
    """params with jax.lax.stop_gradient on the frozen groups (no-op when none)."""
    if not frozen:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.lax.stop_gradient(p) if _group(path) in frozen else p, params)


def _state_in(tx: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """`tx` with its state created from the parameters cast to `dtype` ("" = as they are) and
    every state leaf cast back to its initial dtype after an update (optax's Adam would
    otherwise turn bfloat16 moments into float32 ones at the first float32 gradient)."""
    def init(params):
        if dtype:  # optax.tree_map_params calls init with a placeholder leaf: leave it alone
            params = jax.tree.map(lambda p: p.astype(dtype) if hasattr(p, "astype") else p, params)
        return tx.init(params)

    def update(updates, state, params=None):
        updates, new_state = tx.update(updates, state, params)
        return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, *, external_lr: bool = False) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) -> AdamW(schedule, weight_decay on matrices), with the
    moments in `cfg.state_dtype`; frozen groups get zero updates and no optimizer state.

    external_lr: AdamW at learning rate 1 (the update's direction, sign included); the caller
    multiplies it by the schedule at a step it counts itself (`scale_updates`). The train step
    does this so that replay updates (ALGORITHMS.md section 8) do not advance the schedule;
    optax's own schedule counts every update. The result is bit-identical: optax scales by
    -lr in one multiply, and x * -1 * lr == x * -lr exactly in IEEE arithmetic.
    """
    lr = 1.0 if external_lr else make_schedule(cfg)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.frozen:
        frozen = frozenset(cfg.frozen)
        adamw = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                      lambda params: trainable_labels(params, frozen))
    if cfg.max_grad_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return _state_in(adamw, cfg.state_dtype)


def scale_updates(updates, lr):
    """The updates of `make_optimizer(external_lr=True)` times the learning rate, cast to each
    update's dtype as optax's scale_by_schedule does."""
    return jax.tree.map(lambda u: jax.numpy.asarray(lr, u.dtype) * u, updates)
