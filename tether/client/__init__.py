"""The tether SDK: Tinker-shaped clients whose every call returns an `APIFuture`.

`ServiceClient` makes `TrainingClient`s, `SamplingClient`s and a `RestClient`. The SDK depends on
`tether.types` only (torch just for custom losses) and never on the server, so it runs against any
Tinker-compatible server, and `ServiceClient(base_url="local")` starts tether's own in a child
process.

    import tether

    service = tether.ServiceClient(base_url="local")            # or a URL and api_key="tml-..."
    trainer = service.create_lora_training_client("tether/tiny-qwen3", rank=8).result()
    datum = tether.datum_from_model_input_weights(tether.ModelInput.from_ints(tokens), weights)
    step = trainer.forward_backward([datum], "cross_entropy")  # submitted at once ...
    update = trainer.optim_step(tether.AdamParams(learning_rate=1e-4))  # ... and pipelined
    print(step.result().metrics["loss:sum"], update.result().metrics)
"""

from tether.client.api_future import APIFuture, ClientFuture
from tether.client.datum_helpers import datum_from_model_input_weights, truncate_model_input
from tether.client.rest_client import RestClient
from tether.client.sampling_client import SamplingClient
from tether.client.service_client import ServiceClient
from tether.client.training_client import TrainingClient

__all__ = [
    "APIFuture",
    "ClientFuture",
    "RestClient",
    "SamplingClient",
    "ServiceClient",
    "TrainingClient",
    "datum_from_model_input_weights",
    "truncate_model_input",
]
