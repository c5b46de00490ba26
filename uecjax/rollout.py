"""Rollouts: groups of G responses per prompt, rewards, advantages and success rates, UEC's
rollout-level exploration with selective retention, DAPO dynamic sampling, and the replay
stabilizer (ALGORITHMS.md sections 2, 5, 7, 8).

    rows, stats = rollout.collect(params)   # exactly batch_rows / hosts.count rows, one step

A round samples B prompts (n = G, T), grades them in the grader's worker processes while the
trainer scores them (old / reference log-probs), computes group advantages and success rates
(`uecjax.groups`) and keeps the informative rows; [UEC] hard prompts get G' more responses at
T'. Rounds repeat until the buffer holds a batch. With several processes (`hosts`) each
samples, grades and keeps only its own rows, and the shares agree through `hosts.gather` on the
sampler calls, the rounds, exploration and replay. docs/DESIGN.md: "Rollouts", "One training
step", "Several processes (multi-host)".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import numpy as np

from uecjax.groups import group_stats, informative_groups, shaped_rewards
from uecjax.objectives.entropy_control import per_sequence
from uecjax.objectives.loss_config import LossConfig
from uecjax.objectives.methods import uec_gate
from uecjax.rows import RowBuffer, Rows
from uecjax.sampler import SamplingParams
from uecjax.parallel.hosts import Hosts
from uecjax.vision_inputs import PromptImages, stack_images


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled and which of them train (sections 2, 7, 8)."""

    prompts_per_batch: int = 8  # B
    group_size: int = 5  # G
    max_prompt_len: int = 512  # P: longer prompts are skipped and counted
    max_new_tokens: int = 512  # R
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # -- section 8: UEC at the rollout level --
    explore: bool = False  # G' extra responses at T' for hard prompts
    explore_samples: int = 20  # G'
    explore_temperature: float = 1.2  # T'
    explore_threshold: float = 0.01  # explored: every score of the prompt's group below this
    # The score of that test: "accuracy" (the spec and the authors' code, which test the
    # accuracy reward against 0.01) or "reward", the full reward (with a format reward a
    # well-formatted wrong response scores 0.1 and hides its prompt from exploration).
    explore_on: str = "accuracy"
    retention: bool = False  # keep regular rows with |A| > retain_min, exploration with |A'| > ...
    retain_min: float = 0.05
    explore_retain_min: float = 1.0
    # With the section-6 gate on (LossConfig.explore), regular rows whose prompt has gate
    # weight w_q > 0 stay even with A = 0 (policy-loss weight 0, exploration weight w_q):
    # retention and dynamic sampling would otherwise drop exactly the rows of hard prompts
    # (all-equal rewards), so the entropy bonus never reached them. False: the old behaviour
    # (retention and dynamic sampling judge the advantage / rewards alone).
    retain_gated: bool = True
    drop_overlong_positive: bool = False  # drop responses that hit the limit with A > 0
    replay: bool = False  # replay stabilizer
    replay_min_advantage: float = 1.0  # A_0
    replay_every: int = 5  # f
    replay_capacity: int = 0  # 0: 2 * B * G
    # Replay rows' old log-probs and entropies: False, those stored when they were sampled
    # (the authors' code); True, recomputed with the trainer's current parameters when the
    # replay batch is drawn (the reference log-probs stay as stored).
    replay_recompute: bool = False
    max_rounds: int = 8  # sampling rounds per batch before padding it with empty rows
    # DAPO dynamic sampling (LossConfig.dynamic_sampling) drops groups whose scores are all
    # equal: "accuracy" (DAPO: prompts every response solves or every response fails) or
    # "reward", the shaped rewards (format and overlong shaping make a wrong group "mixed").
    dynamic_sampling_on: str = "accuracy"

    @property
    def batch_rows(self) -> int:
        return self.prompts_per_batch * self.group_size

    def __post_init__(self):
        for name in ("prompts_per_batch", "group_size", "max_prompt_len", "max_new_tokens",
                     "explore_samples", "replay_every", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size={self.group_size}: group advantages need >= 2")
        for name in ("explore_on", "dynamic_sampling_on"):
            if getattr(self, name) not in ("reward", "accuracy"):
                raise ValueError(f"rollout.{name}={getattr(self, name)!r}: 'reward' or 'accuracy'")
        if self.explore and self.explore_samples < 2:
            raise ValueError("rollout.explore_samples must be >= 2 (advantages within the group)")


# Rollout-level switches of the methods that have them (section 8 for UEC; DAPO's dynamic
# sampling and overlong shaping are LossConfig fields, read from there).
ROLLOUT_PRESETS = {
    "uec": dict(explore=True, retention=True, drop_overlong_positive=True),
    "uec_code": dict(explore=True, retention=True, drop_overlong_positive=True, replay=True),
}


def rollout_config(method: str, **overrides) -> RolloutConfig:
    """The method's rollout preset, then `overrides` (e.g. from a config file)."""
    return RolloutConfig(**{**ROLLOUT_PRESETS.get(method, {}), **overrides})


def merge_share_stats(shares: list[dict]) -> dict:
    """The row shares' statistics as one: counts and sums added, times the slowest share's."""
    out: dict[str, float] = {}
    for stats in shares:
        for key, value in stats.items():
            out[key] = max(out.get(key, value), value) if key.startswith("time/") \
                else out.get(key, 0) + value
    return out


@dataclasses.dataclass
class Prompt:
    ids: list[int]  # with each image's tokens when `images` is set
    answer: str
    choices: tuple[str, ...] = ()
    images: PromptImages | None = None  # Qwen2.5-VL: the prompt's preprocessed images


class Rollout:
    """Turns prompts into fixed-size sets of training rows with the current policy.

    sampler: `uecjax.sampler.Sampler` over the policy being trained (reads its parameters).
    grade: (texts, answers, choices) -> Future of a list with .reward and .accuracy per text.
    score: (params, rows, with_ref=True) -> (old_logp, old_entropy, ref_logp or None), the
        trainer's log-probs of the rows at temperature 1 (`TrainStep.score`; with_ref=False:
        no reference pass), dispatched asynchronously so that grading in the worker processes
        overlaps it. Also called by `replay_batch` with replay_recompute.
    decode: (response_tokens [n, R], response_mask [n, R]) -> n texts
        (`uecjax.tokenizer.decode_responses`).
    hosts: this process's share of the rows and the all-gather the shares agree through
        (module docstring); `Hosts()`, one share, for a single process.
    prompts: this process's prompts (its block of every batch, `uecjax.data.shard_batches`).
    """

    def __init__(self, cfg: RolloutConfig, loss_cfg: LossConfig, *, sampler,
                 prompts: Iterator[Prompt], grade: Callable, score: Callable, decode: Callable,
                 stop_token_ids: tuple[int, ...], seed: int = 0, hosts: Hosts = Hosts()):
        if cfg.prompts_per_batch % hosts.count:
            raise ValueError(f"rollout.prompts_per_batch={cfg.prompts_per_batch} is not a multiple "
                             f"of the {hosts.count} row shares")
        self.hosts = hosts
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.sampler = sampler
        self.prompts = prompts
        self.grade = grade
        self.score = score
        self.decode = decode
        self.stop_ids = tuple(stop_token_ids)
        self.seed = seed
        self.rows_per_batch = cfg.batch_rows // hosts.count  # this process's rows of a batch
        self.buffer = RowBuffer()
        self.replay = RowBuffer((cfg.replay_capacity or 2 * cfg.batch_rows) // hosts.count)
        # Rounds fill every share exactly unless rows are dropped or added by selection.
        self.selective = (cfg.explore or cfg.retention or cfg.drop_overlong_positive
                          or loss_cfg.dynamic_sampling)
        self.calls = 0  # sampler calls, for distinct seeds
        self.stats: dict[str, float] = {}

    # -- one sampling round ----------------------------------------------------------------
    def _sample(self, params, prompts: list[Prompt], n: int, temperature: float,
                real: int | None = None) -> Rows:
        """Rows of this process's `prompts` (every share passes as many), scored with the
        trainer's `params`; only the first `real` prompts' rows are graded and returned (the
        rest pad a collective call)."""
        cfg = self.cfg
        self.calls += 1
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k, stop_token_ids=self.stop_ids,
                                n=n, seed=self.seed * 1_000_003 + self.calls)
        t = time.perf_counter()
        everyone = [q for block in self.hosts.gather(prompts) for q in block]  # the call is collective
        images = [p.images for p in everyone] if any(p.images is not None for p in everyone) else None
        out = self.sampler([p.ids for p in everyone], sampling, images=images, hosts=self.hosts)
        self._add("time/sampling", time.perf_counter() - t)
        keep = slice(0, n * (len(prompts) if real is None else real))
        sampled, prompts = prompts, prompts[:real]
        self._add("sampled_tokens", float(out.response_mask[keep].sum()))
        texts = self.decode(out.response_tokens[keep], out.response_mask[keep])
        answers = [p.answer for p in prompts for _ in range(n)]
        choices = [p.choices for p in prompts for _ in range(n)]
        future = self.grade(texts, answers, choices)
        row_images = (None, None)  # each sample row carries its prompt's images
        if images is not None:
            patch_dim = next(im for im in images if im is not None).pixel_values.shape[1]
            row_images = stack_images([p.images for p in sampled for _ in range(n)], patch_dim)
        rows = Rows.from_sampler(out, cfg.max_prompt_len, *row_images)
        # Scoring is collective too: every share scores all its sampled rows.
        scored = self.score(params, rows)
        t = time.perf_counter()
        rewards = future.result()
        self._add("time/grading_wait", time.perf_counter() - t)
        old_logp, old_entropy, ref_logp = (None if x is None else np.asarray(x, np.float32)[keep]
                                           for x in scored)
        return dataclasses.replace(
            rows.select(keep), old_logp=old_logp, old_entropy=old_entropy, ref_logp=ref_logp,
            reward=np.array([r.reward for r in rewards], np.float32),
            accuracy=np.array([r.accuracy for r in rewards], np.float32))

    def _next_prompts(self) -> list[Prompt]:
        return [next(self.prompts) for _ in range(self.cfg.prompts_per_batch // self.hosts.count)]

    def _round(self, params) -> None:
        cfg = self.cfg
        G = cfg.group_size
        prompts = self._next_prompts()
        rows = self._sample(params, prompts, G, cfg.temperature)
        lengths = rows.response_mask.sum(axis=1)
        shaped = shaped_rewards(rows.reward, lengths, cfg.max_new_tokens, self.loss_cfg)
        stats = group_stats(shaped, rows.accuracy, G, self.loss_cfg.advantage)
        rows.advantage, rows.success_rate, p_q = stats.advantage, stats.success_rate, stats.prompt_success
        gate = np.asarray(uec_gate(p_q, self.loss_cfg), np.float32) if self.loss_cfg.explore else None
        # Rows the section-6 exploration term weighs (w_q > 0) stay whatever their advantage.
        gated = (per_sequence(gate > 0, G) > 0 if gate is not None and cfg.retain_gated
                 else np.zeros(len(rows), bool))
        keep = np.ones(len(rows), bool)
        if self.loss_cfg.dynamic_sampling:
            score = rows.accuracy if cfg.dynamic_sampling_on == "accuracy" else shaped
            keep &= np.repeat(informative_groups(score, G), G) | gated
        if cfg.retention:
            keep &= (np.abs(rows.advantage) > cfg.retain_min) | gated
        if cfg.drop_overlong_positive:
            keep &= ~(rows.truncated & (rows.advantage > 0))
        self._log_round(rows, p_q, gate, keep)
        self.buffer.push(rows.select(keep))
        if cfg.explore:
            score = rows.reward if cfg.explore_on == "reward" else rows.accuracy
            explored = np.flatnonzero((score.reshape(-1, G) < cfg.explore_threshold).all(axis=1))
            self._add("explore/prompts", len(explored))
            # One exploration call for all shares, each padded to the most explored prompts.
            most = max(self.hosts.gather(len(explored)))
            if most:
                chosen = [prompts[i] for i in explored]
                padding = [chosen[0] if chosen else prompts[0]] * (most - len(explored))
                self._explore(params, chosen + padding, p_q[explored], real=len(explored))

    def _explore(self, params, prompts: list[Prompt], p_q: np.ndarray, real: int) -> None:
        cfg = self.cfg
        G2 = cfg.explore_samples
        rows = self._sample(params, prompts, G2, cfg.explore_temperature, real=real)
        # Advantages within the G' group; each row keeps its prompt's regular success rate.
        stats = group_stats(rows.reward, None, G2, "grpo", prompt_success=p_q)
        rows.advantage, rows.success_rate = stats.advantage, stats.success_rate
        rows.explore[:] = True
        keep = np.abs(rows.advantage) > cfg.explore_retain_min
        if cfg.drop_overlong_positive:
            keep &= ~(rows.truncated & (rows.advantage > 0))
        self._add("explore/responses", len(rows))
        self._add("explore/kept", int(keep.sum()))
        self._add("explore/successes", float(rows.accuracy.sum()))
        self.buffer.push(rows.select(keep))

    # -- a batch ---------------------------------------------------------------------------
    def collect(self, params) -> tuple[Rows, dict]:
        """Exactly `batch_rows` rows for one update, and the rollout's metrics; `params`: the
        trainer's current parameters, which score the rows (old / reference log-probs)."""
        cfg = self.cfg
        self.stats = {}
        need = self.rows_per_batch
        rounds = 0
        while rounds < cfg.max_rounds and self._short(need):
            self._round(params)
            rounds += 1
        rows = self.buffer.pop(need)
        missing = need - (0 if rows is None else len(rows))
        if missing:  # still short after max_rounds: pad with rows that weigh nothing
            rows = Rows.concat([rows, Rows.empty(missing, cfg.max_prompt_len, cfg.max_new_tokens,
                                                 self.loss_cfg.beta > 0)])
        self._add("rollout/padded_rows", missing)
        self._add("rollout/buffered_rows", len(self.buffer))
        self.stats = merge_share_stats(self.hosts.gather(self.stats))
        self.stats["rollout/rounds"] = rounds
        return rows, self._summary()

    def _short(self, need: int) -> bool:
        """Does any share hold fewer than `need` rows? (The same answer on every process.)"""
        if not self.selective:  # every round fills every share exactly
            return len(self.buffer) < need
        return any(self.hosts.gather(len(self.buffer) < need))

    def remember_for_replay(self, rows: Rows) -> None:
        """Replay stabilizer: rows with A > A_0 go to the FIFO (with their log-probs)."""
        if self.cfg.replay:
            self.replay.push(rows.select(rows.advantage > self.cfg.replay_min_advantage))

    def replay_batch(self, step: int, rng: np.random.Generator, params) -> Rows | None:
        """Every f steps, a batch drawn from the replay FIFO (None when not due or when any
        share's FIFO holds less than its share of a batch). rng: this share's own. With
        replay_recompute the drawn rows' old log-probs and entropies are rescored with the
        trainer's current `params` (reference log-probs as stored; every share calls, as
        scoring is collective); the FIFO keeps the stored values."""
        cfg = self.cfg
        if not cfg.replay or step % cfg.replay_every:
            return None
        if not all(self.hosts.gather(len(self.replay) >= self.rows_per_batch)):
            return None
        rows = self.replay.sample(self.rows_per_batch, rng)
        if not cfg.replay_recompute:
            return rows
        old_logp, old_entropy, _ = self.score(params, rows, with_ref=False)
        return dataclasses.replace(rows, old_logp=np.asarray(old_logp, np.float32),
                                   old_entropy=np.asarray(old_entropy, np.float32))

    # -- metrics ---------------------------------------------------------------------------
    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value)

    def _log_round(self, rows: Rows, p_q: np.ndarray, gate: np.ndarray | None,
                   keep: np.ndarray) -> None:
        """A regular round's statistics, over all its rows and prompts (before selection):
        sums and counts only, so that the shares' merge adds them (divided in `_summary`)."""
        self._add("reward_sum", float(rows.reward.sum()))
        self._add("accuracy_sum", float(rows.accuracy.sum()))
        self._add("length_sum", float(rows.response_mask.sum()))
        self._add("truncated_sum", float(rows.truncated.sum()))
        self._add("responses", len(rows))
        self._add("kept", int(keep.sum()))
        self._add("prompts", len(p_q))
        self._add("hard_prompts", float((p_q <= self.loss_cfg.tau_hard).sum()))
        if gate is not None:
            self._add("gate_sum", float(gate.sum()))
        # The policy's own samples at T, unselected: H_0's measurement (section 6).
        self._add("regular_entropy_sum", float((rows.old_entropy * rows.response_mask).sum()))
        self._add("regular_tokens", float(rows.response_mask.sum()))

    def _summary(self) -> dict:
        s = dict(self.stats)
        n = max(s.pop("responses", 0.0), 1.0)
        prompts = max(s.pop("prompts", 0.0), 1.0)
        out = {
            "reward": s.pop("reward_sum", 0.0) / n,
            "accuracy": s.pop("accuracy_sum", 0.0) / n,
            "response_length": s.pop("length_sum", 0.0) / n,
            "truncated_fraction": s.pop("truncated_sum", 0.0) / n,
            "rollout/kept_fraction": s.pop("kept", 0.0) / n,
            "rollout/hard_prompt_fraction": s.pop("hard_prompts", 0.0) / prompts,
        }
        if "gate_sum" in s:
            out["rollout/gate_mean"] = s.pop("gate_sum") / prompts
        entropy, tokens = s.pop("regular_entropy_sum", 0.0), s.pop("regular_tokens", 0.0)
        out["rollout/regular_tokens"] = tokens
        if tokens > 0:  # absent rather than a made-up 0 when no regular token was sampled
            out["rollout/regular_entropy"] = entropy / tokens
        out.update(s)
        return out
