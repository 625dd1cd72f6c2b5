# syntax=docker/dockerfile:1
# The image of every Ray pod (head, routers, experts, the autoscaler sidecar): Ray, this
# package, and the generated gRPC modules `elasticmoe.v1`, which the Serve proxy imports
# (grpc_options.grpc_servicer_functions) as much as the router replicas do.
#
#   docker build -t elasticmoe:dev-cpu .                                    # CPU: k8s/overlays/dev-cpu
#   docker build --build-arg VARIANT=cu128 -t REGISTRY/elasticmoe:0.1.0-cu128 .  # CUDA 12.8: k8s/overlays/gpu
#
# RAY_VERSION must equal the manifests' rayVersion; tests/k8s/test_k8s_manifests.py checks both
# against the Ray this repository is tested with, and the pins below against pyproject.toml.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG GRPCIO_TOOLS_VERSION=1.85.1

WORKDIR /home/ray/elasticmoe

# torch first, from PyTorch's index for the variant (cpu, cu128, ...): from the default
# index a CPU image would get the CUDA build, several GB it never uses.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${VARIANT}"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users proto ./proto
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users experts ./experts
COPY --chown=ray:users router_service ./router_service

# Generate the gRPC modules as `make proto` does, then install the package (its
# dependencies come from pyproject.toml alone), keeping the base image's Ray and the torch
# build installed above. The last two lines fail the build if an import path the Serve
# config names is missing, and prove elasticmoe.v1 imports from site-packages.
RUN pip install --no-cache-dir "grpcio-tools==${GRPCIO_TOOLS_VERSION}" \
 && python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
        proto/elasticmoe/v1/serving.proto proto/elasticmoe/v1/expert.proto \
 && pip install --no-cache-dir . "ray[serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
 && cd / \
 && python -c "import elasticmoe.v1.serving_pb2_grpc, grpc_health.v1.health_pb2_grpc, cluster.deploy.serve_app, router_service.serving.deployment"

WORKDIR /home/ray
# Serve's gRPC proxy takes messages up to 2 GiB unless told otherwise: cap client messages at 16 MiB
# (router_service/serving/deployment.py: MAX_CLIENT_MESSAGE_BYTES); larger ones are refused RESOURCE_EXHAUSTED.
ENV RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=16777216
