# The nightly GPU job's container: NVIDIA's TensorRT container (CUDA, cuDNN, TensorRT and its Python bindings) with
# this suite and its test extras installed, and a CUDA build of PyTorch. The candidate stack is the base image's tag:
#   docker build --build-arg TRT_TAG=25.10-py3 -t fidelity-suite:25.10-py3 .
#   docker run --rm --gpus all -v "$PWD:/suite" fidelity-suite:25.10-py3 bash .ci/nightly
ARG TRT_TAG=25.10-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}

# The PyTorch wheel index matching the container's CUDA major version.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /suite
# The package metadata first, so that a change to the code alone does not reinstall the dependencies.
COPY pyproject.toml README.md ./
COPY engines/ engines/
COPY fidelity/ fidelity/
COPY perf/ perf/
COPY gate/ gate/
RUN python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -e ".[test]"
COPY . .

CMD ["bash", ".ci/nightly"]
