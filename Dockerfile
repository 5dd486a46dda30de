# harden as a container: `docker run --rm -v "$PWD":/data harden apply model.onnx --faultmap chip.bin --data calib.npz`
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/harden
COPY pyproject.toml README.md ./
COPY harden ./harden
# The README's install: `pip install .` (EXTRAS=train adds torch).
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --create-home --uid 1000 harden

USER harden
WORKDIR /data
ENTRYPOINT ["harden"]
CMD ["--help"]
