"""Where a judge's API key may be sent: said only on the command line of the person running StaySafe.

The ``openai`` judge posts training text with ``Authorization: Bearer $VAR`` to a URL. If any file could name
that URL or that variable (a run's ``config.json``, an ``experiment.json``, a queued job, a checkpoint), whoever
can write the file could collect any secret in the user's environment. So the endpoint is not a run option at
all: it is a :class:`JudgeEndpoint` built from command-line flags (:func:`endpoint_from_args`) and handed to the
code that needs it. Files only *record* its public part (URL without credentials, model, variable name), and
:func:`endpoint_for` is the one function every entry point (train, resume, experiment, experiment resume, the
queue worker, the dashboard's launches) calls before anything is sent: a run that needs the endpoint gets it
from the command line or not at all, and one that disagrees with what was recorded is refused.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

from staysafe.options import SpecError

LEGACY_FIELDS = ("judge_url", "judge_model", "judge_key_env")  # old config.json keys: compared, never used
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def public_url(url: str) -> str:
    """The URL without user:password or query string (either may carry a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible judge endpoint as typed on the command line. ``allow_http``: send to a non-loopback
    host in cleartext (refused otherwise: the key and the training text would cross the network unencrypted)."""

    url: str
    model: str
    key_env: str = DEFAULT_KEY_ENV
    allow_http: bool = False

    def __post_init__(self):
        parts = urllib.parse.urlsplit(self.url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpecError(f"--judge-url must be an http(s) URL like http://localhost:8000/v1, got {self.url!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname) and not self.allow_http:
            raise SpecError(f"--judge-url {public_url(self.url)} is cleartext http to a host that is not this "
                            "machine: the API key and the training text would cross the network unencrypted; use "
                            "https, or pass --judge-allow-http if that network is yours")
        if not self.model:
            raise SpecError("--judge openai needs --judge-model (the model name at that endpoint)")
        if not self.key_env or not self.key_env.replace("_", "").isalnum():
            raise SpecError(f"--judge-key-env {self.key_env!r} is not an environment variable name")

    def public(self) -> dict:
        """What a file may record: no credential, nothing that is read back as an instruction."""
        return {"url": public_url(self.url), "model": self.model, "key_env": self.key_env}


def endpoint_from_args(args) -> JudgeEndpoint | None:
    """The endpoint typed on this command line (``--judge-url``, ``--judge-model``, ``--judge-key-env``,
    ``--judge-allow-http``), or None when no URL was typed."""
    if not getattr(args, "judge_url", None):
        if getattr(args, "judge_model", None):
            raise SpecError("--judge-model without --judge-url: give both for the openai judge")
        return None
    return JudgeEndpoint(args.judge_url, args.judge_model or "", args.judge_key_env or DEFAULT_KEY_ENV,
                         bool(getattr(args, "judge_allow_http", False)))


def add_endpoint_arguments(parser) -> None:
    """The command-line flags of :func:`endpoint_from_args` (never options in a file)."""
    parser.add_argument("--judge-url", default=None, help="openai judge: an OpenAI-compatible base URL (only ever "
                        "from the command line; a file never chooses where a key is sent)")
    parser.add_argument("--judge-model", default=None, help="openai judge: the model name at that endpoint")
    parser.add_argument("--judge-key-env", default=DEFAULT_KEY_ENV,
                        help=f"openai judge: the environment variable holding the API key (default: {DEFAULT_KEY_ENV})")
    parser.add_argument("--judge-allow-http", action="store_true",
                        help="openai judge: allow a cleartext http:// URL to a host other than this machine")


def needs_endpoint(spec) -> bool:
    """Whether a run's options make it call the openai judge."""
    return spec.judge == "openai" and (spec.risk == "judge" or spec.record_judge)


def recorded_endpoint(recorded: dict | None) -> dict | None:
    """The endpoint a file says a run used (its public part, or an old file's ``judge_url``...), or None."""
    if not isinstance(recorded, dict):
        return None
    public = recorded.get("judge_endpoint")
    legacy = {k: recorded.get(k) for k in LEGACY_FIELDS}
    if public is None and legacy["judge_url"]:
        public = {"url": public_url(str(legacy["judge_url"])), "model": legacy["judge_model"],
                  "key_env": legacy["judge_key_env"] or DEFAULT_KEY_ENV}
    return public


def endpoint_for(spec, given: JudgeEndpoint | None, recorded: dict | None, source: str) -> JudgeEndpoint | None:
    """The endpoint a run may use: ``given`` (from the command line) when the run needs one, never anything a file
    says. A run that needs one without ``given``, or whose file ``recorded`` another endpoint, is refused (a
    SpecError naming ``source``) before any request."""
    if not needs_endpoint(spec):
        return None
    if given is None:
        raise SpecError(f"{source} uses the openai judge, whose URL, model and key variable are taken only from the "
                        "command line (a file never chooses where a key is sent): give --judge-url URL "
                        "--judge-model NAME [--judge-key-env VAR]; a queued or dashboard launch cannot use it")
    was = recorded_endpoint(recorded)
    if was is not None:
        now = given.public()
        diff = [k for k in ("url", "model", "key_env") if was.get(k) != now[k]]
        if diff:
            raise SpecError(
                f"{source} recorded another judge endpoint ({', '.join(f'{k} {was.get(k)!r}' for k in diff)}"
                f") than the command line gives ({', '.join(f'{k} {now[k]!r}' for k in diff)}); "
                "refused before any request: give the endpoint the run used, or start a new run"
            )
    return given
