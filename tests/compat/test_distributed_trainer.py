"""The official tinker SDK against `tether serve --trainer-process --nproc-per-node 2`: a 2-rank FSDP2 trainer.

A subset of `test_tinker_sdk_training` (training, every loss, custom loss, save/resume with optimizer,
full fine-tuning with sampling, sampler and external checkpoints) and the normalised optimizer step
of `test_grad_accumulation` re-run against the distributed trainer: rank 0 serves the op socket and every rank executes each training op.
"""

from __future__ import annotations

import pytest

from .test_grad_accumulation import (  # noqa: F401 - fixtures and tests re-collected here
    extra_body_sdk,
    test_official_sdk_extra_field_normalises_by_loss_tokens,
)
from .test_tinker_sdk_training import (  # noqa: F401 - fixtures and tests re-collected here
    lora_client,
    test_forward_backward_custom_equals_cross_entropy,
    test_forward_matches_cross_entropy_reference_and_does_not_train,
    test_full_fine_tuning_client_trains_saves_and_samples,
    test_loss_falls_on_a_fixed_batch,
    test_named_sampler_checkpoint_samples_like_the_ephemeral_one,
    test_resumed_client_continues_exactly,
    test_rl_losses_run_and_report_loss,
    test_save_weights_external_writes_hugging_face_adapter,
    test_user_error_fails_the_future_and_leaves_the_model_usable,
)


@pytest.fixture(scope="module")
def trainer_mode() -> str:
    return "distributed-2"
