"""What the quality and compare benches measure: workbench configs and foreign endpoints.

A config target is loaded here and served in-process by this workbench's own OpenAI
server, so every target, local or cloud, is measured through the same HTTP path. Targets
come from two command-line options:

    --configs configs/default.yaml,int8=configs/int8.yaml,tiny:llama,q8=runs/export/default-q8_0.gguf
        config files, model sources or saved model folders; named by the file's stem
        unless written NAME=SPEC. A `.gguf` file (from `python -m workbench.export`) is
        served by llama-cpp-python's OpenAI server instead (llamacpp_server.py)
    --endpoint NAME=BASE_URL,model=ID[,key_env=VAR][,price_in=USD][,price_out=USD][,context=N]
        an OpenAI-compatible endpoint (BASE_URL ends in /v1); the API key is read from the
        environment variable VAR, never from the command line; prices are US dollars per
        1K input / output tokens; context is the context length when /v1/models does not say

Mistakes in either are reported before anything is loaded or sent.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

import workbench
from workbench.bench.llamacpp_server import LlamaCppServer, missing_modules
from workbench.config import ConfigError, load_config
from workbench.serve.live import LiveServer

ENDPOINT_SYNTAX = "NAME=BASE_URL,model=ID[,key_env=VAR][,price_in=USD][,price_out=USD][,context=N]"
_ENDPOINT_KEYS = {"model", "key_env", "price_in", "price_out", "context"}


class TargetError(ValueError):
    """A target the user described in a way the bench cannot use; the message says what to fix."""


@dataclass(frozen=True)
class Target:
    name: str
    config: str | None = None
    """A config file, source or folder for a local target; None for an endpoint."""
    base_url: str | None = None
    model: str | None = None
    key_env: str | None = None
    price_in: float | None = None
    """US dollars per 1K prompt tokens (None: not given)."""
    price_out: float | None = None
    context: int | None = None

    @property
    def local(self) -> bool:
        return self.config is not None


@dataclass(frozen=True)
class Endpoint:
    """Where a target answers: an OpenAI base URL (…/v1), the model id to send, the key."""

    base_url: str
    model: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_configs(text: str, *, price_in: float | None = None, price_out: float | None = None) -> list[Target]:
    targets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, spec = part.rpartition("=")
        spec = spec.strip()
        if spec.endswith((".yaml", ".yml")):
            try:
                load_config(spec)
            except ConfigError as exc:
                raise TargetError(f"--configs: {exc}") from None
            name = name or Path(spec).stem
        elif spec.endswith(".gguf"):
            if not Path(spec).expanduser().is_file():
                raise TargetError(
                    f"--configs: {spec} does not exist (write it with python -m workbench.export CONFIG --to gguf --out {spec})"
                )
            if missing := missing_modules():
                raise TargetError(
                    f"--configs: serving {spec} needs llama-cpp-python's server; missing {', '.join(missing)} "
                    "(pip install -e '.[llamacpp]', scripts/install_llamacpp.sh)"
                )
            name = name or Path(spec).stem
        elif spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
            raise TargetError(
                f"--configs: {spec} does not exist (a config file, a model source or a saved model folder)"
            )
        targets.append(Target(name.strip() or spec, config=spec, price_in=price_in, price_out=price_out))
    return targets


def _number(name: str, key: str, value: str, kind: type):
    try:
        number = kind(value)
    except ValueError:
        raise TargetError(
            f"--endpoint {name}: {key}={value!r} is not a {'whole ' if kind is int else ''}number"
        ) from None
    if number < 0 or (kind is int and number == 0):
        raise TargetError(
            f"--endpoint {name}: {key} must be {'positive' if kind is int else 'zero or more'}, got {value}"
        )
    return number


def parse_endpoint(text: str) -> Target:
    head, *options = [p.strip() for p in text.split(",")]
    name, sep, base_url = head.partition("=")
    if not sep or not name.strip() or not base_url.startswith(("http://", "https://")):
        raise TargetError(
            f"--endpoint {text!r}: expected {ENDPOINT_SYNTAX}, e.g. cloud=https://api.openai.com/v1,model=gpt-4o-mini,key_env=OPENAI_API_KEY"
        )
    name = name.strip()
    fields: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key.strip() not in _ENDPOINT_KEYS:
            raise TargetError(
                f"--endpoint {name}: unknown option {option!r}; options are {', '.join(sorted(_ENDPOINT_KEYS))}"
            )
        fields[key.strip()] = value.strip()
    if not fields.get("model"):
        raise TargetError(f"--endpoint {name}: model=ID is required (the model id that endpoint serves)")
    key_env = fields.get("key_env") or None
    if key_env and not os.environ.get(key_env):
        raise TargetError(f"--endpoint {name}: the environment variable {key_env} (key_env) is not set")
    return Target(
        name,
        base_url=base_url.rstrip("/"),
        model=fields["model"],
        key_env=key_env,
        price_in=_number(name, "price_in", fields["price_in"], float) if "price_in" in fields else None,
        price_out=_number(name, "price_out", fields["price_out"], float) if "price_out" in fields else None,
        context=_number(name, "context", fields["context"], int) if "context" in fields else None,
    )


def parse_targets(configs: str | None, endpoints: list[str] | None, *, local_price: str | None = None) -> list[Target]:
    """All targets in command-line order, configs first; the embedded model when none is given."""
    price_in = price_out = None
    if local_price:
        parts = local_price.split(",")
        if len(parts) != 2:
            raise TargetError(
                f"--local-price {local_price!r}: expected IN,OUT in US dollars per 1K tokens, e.g. 0.00002,0.00002"
            )
        price_in, price_out = (
            _number("(local)", k, v.strip(), float) for k, v in zip(("price_in", "price_out"), parts)
        )
    targets = parse_configs(configs, price_in=price_in, price_out=price_out) if configs else []
    targets += [parse_endpoint(e) for e in endpoints or []]
    if not targets:
        targets = parse_configs("default=embedded:smollm2-135m-instruct", price_in=price_in, price_out=price_out)
    names = [t.name for t in targets]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise TargetError(f"two targets are named {', '.join(dupes)}; name them apart with NAME=SPEC")
    return targets


@contextlib.contextmanager
def open_target(target: Target):
    """(endpoint, session): a local target is loaded and served on loopback until the block
    ends; an endpoint target has no session."""
    if target.config is None:  # not local
        assert target.base_url is not None and target.model is not None  # an endpoint target has both
        yield Endpoint(target.base_url, target.model, os.environ.get(target.key_env) if target.key_env else None), None
        return
    if target.config.endswith(".gguf"):
        with LlamaCppServer(target.config, model_name=target.name) as server:
            yield Endpoint(server.base_url + "/v1", target.name), None
        return
    session = workbench.load(target.config, quiet=True)
    with LiveServer(session, model_name=target.name) as live:
        yield Endpoint(live.base_url + "/v1", target.name), session


def probe(endpoint: Endpoint) -> tuple[int | None, str]:
    """(context length the endpoint reports for the model or None, error or "").

    GET /models: vLLM and this workbench report `max_model_len`; some hosts say
    `context_length` or `context_window`. A refused connection or a rejected key is an
    error for the whole target; a host without /models is not."""
    try:
        response = httpx.get(endpoint.base_url + "/models", headers=endpoint.headers(), timeout=30)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if response.status_code in (401, 403):
        return None, f"HTTP {response.status_code}: {response.text[:200]}"
    if response.status_code != 200:
        return None, ""
    try:
        models = response.json().get("data", [])
    except ValueError:
        return None, ""
    for model in models:
        if model.get("id") == endpoint.model:
            for key in ("max_model_len", "context_length", "context_window"):
                if isinstance(model.get(key), int):
                    return model[key], ""
    return None, ""
