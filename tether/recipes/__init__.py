"""Recipes: SFT, GRPO and the quickstart, written against the client API only.

Each recipe is a pydantic `Config` (the CLI is generated from it) and a `main(config)`; the loops
are library functions (`train_sft`, `train_grpo`) that take an existing service client. Pure
logic (batching, schedules, resume bookkeeping, advantages, rewards) lives in small modules that
are tested without a server.
"""
