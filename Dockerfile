# The control plane's image: the webapp under gunicorn, the Celery worker and beat, Flower,
# `voicectl migrate`. GPU nodes do not run from it: they join from outside (README "Deploy").
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src \
    && useradd --system --create-home --home-dir /srv/voice voice \
    && install -d -o voice -g voice -m 0700 /srv/voice/packages   # the packages volume
USER voice
WORKDIR /srv/voice
EXPOSE 8000 5555
CMD ["voicectl", "--help"]
