# harden as a container. Build, then run it on the files in the current folder:
#   docker build -t harden .                             (add --build-arg EXTRAS=train for torch)
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD":/data harden apply model.onnx \
#       --faultmap chip.bin --data calib.npz -o model.hardened.onnx --report report.json
FROM python:3.11-slim

# EXTRAS=train installs the `train` extra (torch) as well: pip install './[train]'.
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user, and /data: the folder meant for the mounted volume.
RUN useradd --create-home --uid 1000 --user-group harden \
    && mkdir /data && chown 1000:1000 /data

WORKDIR /opt/harden
COPY pyproject.toml README.md ./
COPY harden ./harden
# The README's install, `pip install .` ("./" is the same folder; with EXTRAS=train, './[train]').
# .ci/run lints this file with hadolint and runs this line in a fresh virtual environment.
RUN pip install "./${EXTRAS:+[$EXTRAS]}"

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["harden"]
CMD ["--help"]
