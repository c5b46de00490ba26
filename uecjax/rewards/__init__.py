"""Rewards for verifiable answers: `grading` (one response: boxed answer, format, comparison),
`grader` (batches in time-bounded worker processes; the countdown grader), `worker` (the
worker process). Import the submodules: this package imports nothing, so the data sources
can use `grading` without loading the grader."""
