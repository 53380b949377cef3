"""Recipes: SFT, GRPO, DPO, asynchronous RL, on-policy distillation and the quickstart, written
against the client API only.

Each recipe is a pydantic `Config` (the CLI is generated from it) and a `main(config)`; the loops
are library functions (`train_sft`, `train_grpo`, `train_dpo`, `train_rl`, `train_distill`) that take
an existing service client. Pure logic (batching, schedules, resume bookkeeping, advantages,
rewards, preference pairs, the rollout queue) lives in small modules that are tested without a
server.
"""
