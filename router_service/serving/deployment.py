"""RouterDeployment: the router as a Ray Serve deployment behind Serve's gRPC and HTTP ingress.

    client --gRPC--> Serve proxy (port 9000) --> RouterDeployment replica
    client --HTTP--> Serve proxy (port 8000) -->   (the same replica: OpenAI API, openai_api.py)
                     MoEApi -> Engine -> DenseModel + RemoteExperts --gRPC--> expert groups

Serve forwards each registered service's methods to the deployment method of the same
name, so `Generate`, `Score`, `Status` (elasticmoe.v1.MoEService) and `Check`
(grpc.health.v1.Health) are plain methods here. HTTP goes to the ASGI app that
`__serve_build_asgi_app__` builds once the router is up (`serve.ingress()` late-bound, as
Ray Serve's LLM server does), so both protocols share one engine and one KV pool. Serve's ingress is for client traffic
only: router -> expert traffic goes over RemoteExperts' own channels (~0.37 ms a call
against ~4 ms through Serve, DESIGN.md).
"""
from __future__ import annotations

import logging
import os

from elasticmoe.v1 import serving_pb2
from grpc_health.v1 import health_pb2
from ray import serve

from experts.credentials import ExpertCredentials, RouterCredentials
from router_service.serving.api import ApiError
from router_service.serving.auth import AuthError
from router_service.serving.chat_template import ChatTemplate
from router_service.serving.openai_api import build_openai_app
from router_service.serving.router import Router
from router_service.serving.router_config import RouterConfig

log = logging.getLogger(__name__)

# Serve's gRPC proxy accepts messages up to 2 GiB by default (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, Ray 2.60),
# read once where the proxy starts. A Generate request is a few KiB; 16 MiB leaves room for long prompts and
# bounds what one call can make the proxy hold. Larger messages are refused RESOURCE_EXHAUSTED by gRPC.
SERVE_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
MAX_CLIENT_MESSAGE_BYTES = 16 * 2**20


def limit_client_messages(environ=os.environ, limit_bytes: int = MAX_CLIENT_MESSAGE_BYTES) -> None:
    """Cap Serve's gRPC message size for a Ray started from this process (an explicit setting stays).
    `moectl serve`, which knows the model, passes api.max_request_bytes(spec): the largest legal request."""
    environ.setdefault(SERVE_MESSAGE_SIZE_ENV, str(min(limit_bytes, MAX_CLIENT_MESSAGE_BYTES)))


# What `grpc_options.grpc_servicer_functions` must list for this deployment.
GRPC_SERVICER_FUNCTIONS = [
    "elasticmoe.v1.serving_pb2_grpc.add_MoEServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


# max_ongoing_requests: calls a replica holds at once (its engine queues or refuses them, bounded by
# max_running + max_queue). max_queued_requests: calls Serve's proxy may hold for a replica beyond that;
# without it the proxy's queue has no bound, and past it Serve answers RESOURCE_EXHAUSTED itself.
# health_check_period_s: Serve's controller finds a dead replica at its next check; at the default 10 s
# a killed router took 6-12 s to be replaced (tests/integration/test_router_fault_ray.py), most of it waiting for that.
@serve.deployment(name="router", max_ongoing_requests=512, max_queued_requests=1024, health_check_period_s=2.0)
@serve.ingress()
class RouterDeployment:
    def __init__(self, config: dict, credentials: RouterCredentials | None = None):
        router_config = RouterConfig.from_dict(config)
        # Before the model loads: a bad or missing token source fails the replica in seconds, with its reason.
        self.auth = router_config.client_auth()
        if self.auth is None:
            log.warning("client API authentication OFF (allow_unauthenticated: true): anyone who reaches the "
                        "port may call Generate, Score and Status")
        else:
            log.info("client API authentication on: %d token(s), fingerprint %s", len(self.auth),
                     self.auth.fingerprint)
        self.router = Router(router_config, credentials)
        self.config = router_config

    def __serve_build_asgi_app__(self):
        """The HTTP (OpenAI-compatible) app of this replica; Serve calls it once, after __init__."""
        template = ChatTemplate.from_dir(self.config.checkpoint)
        log.info("OpenAI-compatible HTTP API: model %r, chat template %s", self.config.model_name,
                 "from the checkpoint" if template else "none (chat completions refused)")
        return build_openai_app(self.router.api, template, self.auth, self.config.model_name,
                                lambda: self.router.experts.table.version, self.router.serving,
                                MAX_CLIENT_MESSAGE_BYTES)

    def _authenticate(self, grpc_context) -> None:
        """Raise AuthError unless the call carries a valid token. Serve hands the deployment a
        RayServegRPCContext (ray/serve/grpc_util.py): a copy of the proxy's context, metadata included."""
        if self.auth is not None:
            self.auth.check(grpc_context.invocation_metadata())

    async def Generate(self, request: serving_pb2.GenerateRequest, grpc_context):
        try:
            self._authenticate(grpc_context)
            async for response in self.router.api.generate(request):
                yield response
        except (ApiError, AuthError) as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            # Serve's proxy applies a streaming call's context only when a message is yielded
            # (ray/serve/_private/proxy.py, Ray 2.60): without one the client would see OK.
            # The SDK skips messages that carry nothing.
            yield serving_pb2.GenerateResponse()

    async def Score(self, request: serving_pb2.ScoreRequest, grpc_context) -> serving_pb2.ScoreResponse:
        try:
            self._authenticate(grpc_context)
            return await self.router.api.score(request)
        except (ApiError, AuthError) as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            return serving_pb2.ScoreResponse()

    def Status(self, request: serving_pb2.StatusRequest, grpc_context) -> serving_pb2.StatusResponse:
        try:
            self._authenticate(grpc_context)
        except AuthError as e:  # Status names groups and addresses: callers must authenticate too
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            return serving_pb2.StatusResponse()
        return self.router.api.status(request)

    def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """Open without a token: load balancers and kubelet probes carry none, and it says only SERVING or not."""
        serving = self.router.serving()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


def build_app(config: dict, credentials: RouterCredentials | ExpertCredentials | None = None):
    """The Serve application: `serve.run(build_app(config, credentials))`. credentials (the controller's
    router_credentials(); the cluster's own are cut to the router's share here, before they reach Ray) travel
    as a deployment argument inside Ray, never in config or logs. A config without a token source needs
    allow_unauthenticated: true, checked here so a deploy fails at once rather than replica by replica."""
    RouterConfig.from_dict(config).check_auth_setting()
    if isinstance(credentials, ExpertCredentials):
        credentials = credentials.for_router()
    return RouterDeployment.bind(config, credentials)
