"""HTTP clients for a real front door: the official ``openai`` package, and httpx for raw bodies."""

from __future__ import annotations

import httpx
import openai

from cluster.frontdoor import FrontDoor


def client(door: FrontDoor, key: str = "none", **kwargs) -> openai.OpenAI:
    """No retries: a test sees each status the server sends."""
    assert door.http is not None, "the front door serves no HTTP (frontdoor.http.port is null)"
    return openai.OpenAI(base_url=f"{door.http.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)


def anonymous(door: FrontDoor) -> openai.OpenAI:
    """A client that sends no key at all (a door with only peers' keys takes such a call as anonymous)."""
    unsigned = httpx.Client(event_hooks={"request": [lambda request: request.headers.pop("authorization", None)]})
    return client(door, http_client=unsigned)


def status_error(fn) -> openai.APIStatusError:
    try:
        fn()
    except openai.APIStatusError as e:
        return e
    raise AssertionError("the call succeeded; expected an HTTP error status")
