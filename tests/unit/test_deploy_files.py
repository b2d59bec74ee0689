"""The deployment files held against the code, with no Docker engine and no broker.

docker-compose.yml, the Dockerfile, .env.example and the RabbitMQ definitions cannot be run on
these machines, so these tests check what would break them: a service command that is not a
module, a variable that is not a setting, a compose file the specification rejects, definitions
whose queues differ from what the services declare (RabbitMQ refuses the redeclaration), or
permissions that deny a service what it needs or grant it more.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
from aio_pika.abc import ExchangeType

from shared import lifecycle, topology
from shared.amqp import declare_topology
from shared.settings import Settings
from tests.compose_files import environment_of, interpolated, read_env_file

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"
DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = REPO / "deploy" / "rabbitmq" / "rabbitmq.conf"
HASH_SCRIPT = REPO / "deploy" / "rabbitmq" / "hash_password.py"
COMPOSE_SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
CLUSTER = REPO / "deploy" / "rabbitmq" / "cluster"
CLUSTER_CONF = CLUSTER / "rabbitmq.conf"
CLUSTER_DEFINITIONS = CLUSTER / "definitions.json"
CLUSTER_ENV = CLUSTER / "cluster.env"
RECONCILIATION_CONF = CLUSTER / "reconciliation.conf"  # RabbitMQ 3.13+ only
NO_RECONCILIATION_CONF = CLUSTER / "no-reconciliation.conf"
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
LANE = REPO / "scripts" / "container-lane"
CLUSTER_NODES = ("rabbitmq-a", "rabbitmq-b", "rabbitmq-c")  # the `cluster` profile

APP_SERVICES = ("resolver", "timer", "persistence")
VHOST = "bangui"
SERVICE_USERS = {name: f"geo-{name}" for name in APP_SERVICES}
PUBLISHER = "bangui-publisher"
ADMIN = "bangui-admin"
# The development-only passwords whose hashes definitions.json carries (deploy/README.md).
DEV_PASSWORDS = {user: f"dev-only-{user}" for user in [*SERVICE_USERS.values(), PUBLISHER, ADMIN]}


# --- loading the files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """The compose model as `docker compose up` sees it with no variables set (the defaults)."""
    result = interpolated(raw_compose, {})
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    loaded = json.loads(DEFINITIONS.read_text())
    assert isinstance(loaded, dict)
    return loaded


def env_example() -> dict[str, str]:
    """Every GEO_* variable .env.example names, commented out or not, with its value."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*(GEO_[A-Z0-9_]+)=(.*)", line.strip())
        if match:
            assert match.group(1) not in found, f"{match.group(1)} appears twice in .env.example"
            found[match.group(1)] = match.group(2).strip()
    return found


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        parsed = cls()
        logical = re.sub(r"\\\n", " ", text)  # line continuations
        for line in logical.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keyword, _, rest = line.partition(" ")
                parsed.instructions.append((keyword.upper(), rest.strip()))
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def index_of_last(self, keyword: str, contains: str = "") -> int:
        hits = [i for i, (kw, rest) in enumerate(self.instructions) if kw == keyword]
        hits = [i for i in hits if contains in self.instructions[i][1]]
        assert hits, f"Dockerfile has no {keyword} {contains}".strip()
        return hits[-1]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE.read_text())


def module_exists(dotted: str) -> bool:
    """``python -m dotted`` from the repository root runs dotted/__main__.py or dotted.py."""
    path = REPO.joinpath(*dotted.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def command_module(command: Any) -> str:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert len(argv) == 3, f"expected `python -m <module>`, got {argv}"
    assert argv[0] in ("python", "python3"), argv
    assert argv[1] == "-m", argv
    return str(argv[2])


def duration_seconds(text: str) -> float:
    """A compose duration such as 15s, 1m30s, 1500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def hash_matches(password_hash: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt(4) + sha256(salt + password))."""
    raw = base64.b64decode(password_hash, validate=True)
    salt, digest = raw[:4], raw[4:]
    return len(digest) == 32 and hashlib.sha256(salt + password.encode()).digest() == digest


# --- compose: schema, commands, settings ------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The schema says "https://json-schema.org/draft-07/schema", a spelling jsonschema does not
    # map to a draft (it would fall back to the latest one): name the draft explicitly.
    assert schema["$schema"].rstrip("#") in (
        "https://json-schema.org/draft-07/schema",
        "http://json-schema.org/draft-07/schema",
    )
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert errors == []
    # The validator does reject what the specification forbids, so the pass above means something.
    broken = json.loads(json.dumps(compose))
    broken["services"]["resolver"]["restart_policy"] = "always"
    broken["services"]["timer"]["depends_on"]["rabbitmq"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) == 2


def test_every_service_command_is_a_module_of_the_contract(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", *APP_SERVICES, *CLUSTER_NODES, "agent", "postgres"}
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"rabbitmq", *APP_SERVICES}  # `docker compose up` starts what it did
    for name in APP_SERVICES:
        module = command_module(services[name]["command"])
        assert module == f"services.{name}", f"{name} runs {module}"
        assert module_exists(module), f"{name}: no module {module} (services/{name}/__main__.py)"
    (cmd,) = dockerfile.all("CMD")
    default = command_module(json.loads(cmd))  # exec form, so python is PID 1 and gets SIGTERM
    assert default in {f"services.{name}" for name in APP_SERVICES}
    assert module_exists(default)


def test_every_geo_variable_set_is_a_setting_and_its_value_is_valid(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    fields = set(Settings.model_fields)
    image_env = {}
    for rest in dockerfile.all("ENV"):
        image_env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    sources = {"Dockerfile ENV": image_env, ".env.example": env_example()}
    for name, service in compose["services"].items():
        sources[f"compose {name}"] = environment_of(service)
    checked = 0
    for where, env in sources.items():
        geo = {k: v for k, v in env.items() if k.startswith("GEO_")}
        unknown = sorted(k for k in geo if k.removeprefix("GEO_").lower() not in fields)
        assert unknown == [], f"{where} sets variables that are not settings: {unknown}"
        values = {k.removeprefix("GEO_").lower(): v for k, v in geo.items() if v != ""}
        Settings(**values)  # every value set is one the services accept
        checked += len(geo)
    assert checked >= len(fields)
    for name in APP_SERVICES:  # what the container finally sees is valid too
        env = {**image_env, **environment_of(compose["services"][name])}
        Settings(**{k.removeprefix("GEO_").lower(): v for k, v in env.items() if k[:4] == "GEO_"})


def test_env_example_documents_every_setting_with_its_default() -> None:
    documented = env_example()
    expected = {f"GEO_{name.upper()}" for name in Settings.model_fields}
    assert set(documented) == expected, (
        f"missing: {sorted(expected - set(documented))}, "
        f"unknown: {sorted(set(documented) - expected)}"
    )
    for variable, value in documented.items():
        name = variable.removeprefix("GEO_").lower()
        default = Settings.model_fields[name].default
        if value == "":
            assert default is None, f"{variable} documented as unset but defaults to {default!r}"
            continue
        parsed = getattr(Settings(**{name: value}), name)
        assert parsed == default, f"{variable}={value} in .env.example, default is {default!r}"
    text = ENV_EXAMPLE.read_text()
    assert "DEVELOPMENT-ONLY" in text  # the guest default and the compose passwords say so


# --- compose: wiring --------------------------------------------------------------------------


def test_app_services_wait_for_a_healthy_broker_restart_and_read_dot_env(
    compose: dict[str, Any],
) -> None:
    for name in APP_SERVICES:
        service = compose["services"][name]
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert service["restart"] == "unless-stopped", name
        env_files = service["env_file"]
        env_files = [env_files] if isinstance(env_files, str) else env_files
        paths = [f if isinstance(f, str) else f["path"] for f in env_files]
        assert ".env" in paths, name


def test_one_service_builds_the_image_the_others_run(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builders = [name for name in APP_SERVICES if "build" in services[name]]
    assert builders == ["resolver"], "`up --build` builds and exports the image once per `build:`"
    assert services["resolver"]["build"]["context"] == "."
    # pip's CA bundle behind a TLS-intercepting proxy: a build secret, empty unless set.
    assert services["resolver"]["build"]["secrets"] == ["build_ca"]
    assert compose["secrets"]["build_ca"]["file"] == "/dev/null"
    assert services["resolver"]["pull_policy"] == "build"
    images = {services[name]["image"] for name in APP_SERVICES}
    assert images == {"bangui-geo:local"}
    for name in ("timer", "persistence"):
        # Never pulled: the image exists only where resolver built it.
        assert services[name]["pull_policy"] == "never", name


def test_host_ports_come_from_variables_with_the_usual_defaults(
    raw_compose: dict[str, Any],
) -> None:
    expected = {
        "rabbitmq": {
            "RABBITMQ_AMQP_PORT": (5672, 5672),
            "RABBITMQ_MANAGEMENT_PORT": (15672, 15672),
        },
        **{
            f"rabbitmq-{node.lower()}": {
                f"RABBITMQ_{node}_AMQP_PORT": (5680 + i, 5672),
                f"RABBITMQ_{node}_MANAGEMENT_PORT": (15680 + i, 15672),
            }
            for i, node in enumerate("ABC", start=1)
        },
    }
    for name, variables in expected.items():
        ports = raw_compose["services"][name]["ports"]
        default = {str(p) for p in interpolated(ports, {})}
        assert default == {f"127.0.0.1:{h}:{c}" for h, c in variables.values()}, name
        moved = {var: str(40000 + i) for i, var in enumerate(variables)}
        published = {str(p) for p in interpolated(ports, moved)}
        assert published == {f"127.0.0.1:{moved[var]}:{c}" for var, (_, c) in variables.items()}, (
            name
        )
    text = README.read_text() + ENV_EXAMPLE.read_text()
    for variables in expected.values():
        for var in variables:
            assert var in text, f"{var} is documented in neither README.md nor .env.example"


def test_image_has_a_healthcheck_on_the_health_endpoint(dockerfile: Dockerfile) -> None:
    env = " ".join(dockerfile.all("ENV"))
    port = re.search(r"GEO_METRICS_PORT=(\d+)", env)
    assert port
    (check,) = dockerfile.all("HEALTHCHECK")
    assert f"http://127.0.0.1:{port.group(1)}/health" in check


def test_readme_compose_section_is_what_the_container_lane_runs() -> None:
    readme = README.read_text()
    section = readme.split("## Run with docker compose", 1)[1].split("\n## ", 1)[0]
    for command in (
        "docker compose up --build --wait",
        "bangui-geo publish -",
        "persistence bangui-geo stats",
        "docker compose down -v",
        "scripts/container-lane",
    ):
        assert command in section, command
    stack = (REPO / "tests" / "container" / "stack.py").read_text()
    tests = (REPO / "tests" / "container" / "test_compose.py").read_text()
    assert '"up", "--build", "--wait"' in tests
    assert '"down", "-v"' in tests
    assert '"bangui-geo",\n            "publish"' in stack or '"bangui-geo", "publish"' in stack
    assert '"persistence", "bangui-geo", "stats"' in stack


def test_ci_runs_the_container_lane_after_the_main_tests() -> None:
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    runs = [line for line in lines if line and not line.startswith("#")]
    main = next(i for i, line in enumerate(runs) if "scripts/test" in line)
    lane = next(i for i, line in enumerate(runs) if "scripts/container-lane" in line)
    assert main < lane
    assert LANE.stat().st_mode & 0o111, "scripts/container-lane is not executable"


def test_each_service_uses_its_own_broker_user_on_the_bangui_vhost(
    raw_compose: dict[str, Any], compose: dict[str, Any], definitions: dict[str, Any]
) -> None:
    hashes = {u["name"]: u["password_hash"] for u in definitions["users"]}
    for name, user in SERVICE_USERS.items():
        url = urlsplit(environment_of(compose["services"][name])["GEO_AMQP_URL"])
        assert (url.scheme, url.hostname, url.port) == ("amqp", "rabbitmq", 5672), name
        assert unquote(url.path.removeprefix("/")) == VHOST, name
        assert url.username == user, f"{name} connects as {url.username}"
        password = unquote(url.password or "")
        assert password == DEV_PASSWORDS[user]  # the marked development default...
        assert hash_matches(hashes[user], password), f"{user}: password does not match its hash"
        # ...which an operator replaces from the environment without editing the file.
        replaced = interpolated(raw_compose, {f"{name.upper()}_AMQP_PASSWORD": "s3cret"})
        replaced_url = environment_of(replaced["services"][name])["GEO_AMQP_URL"]
        assert urlsplit(replaced_url).password == "s3cret", name


def test_persistence_keeps_the_database_on_a_named_volume(compose: dict[str, Any]) -> None:
    persistence = compose["services"]["persistence"]
    db_path = PurePosixPath(environment_of(persistence)["GEO_DB_PATH"])
    mounts = {}
    for volume in persistence["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[PurePosixPath(target)] = source
    assert db_path.parent in mounts, f"{db_path.parent} is not a mounted volume"
    assert mounts[db_path.parent] in compose["volumes"], "the /data volume is not a named volume"


def test_stop_grace_period_outlasts_the_services_own_shutdown(compose: dict[str, Any]) -> None:
    drain = Settings.model_fields["drain_timeout"]
    max_drain = next(m.le for m in drain.metadata if getattr(m, "le", None) is not None)
    for name in APP_SERVICES:
        service = compose["services"][name]
        grace = duration_seconds(service["stop_grace_period"])
        configured = float(environment_of(service).get("GEO_DRAIN_TIMEOUT", drain.default))
        assert grace > configured, f"{name}: {grace}s is not longer than the drain timeout"
        assert grace > max_drain, f"{name}: {grace}s < the largest GEO_DRAIN_TIMEOUT allowed"
        assert grace > lifecycle.SHUTDOWN_CAP, f"{name}: SIGKILL before the service's own cap"


def test_rabbitmq_loads_the_definitions_with_a_healthcheck_and_published_ports(
    compose: dict[str, Any],
) -> None:
    broker = compose["services"]["rabbitmq"]
    image, _, tag = broker["image"].partition(":")
    assert image == "rabbitmq"
    assert "management" in tag  # the UI on 15672
    conf = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=")
            for line in RABBITMQ_CONF.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    )
    mounts = {}
    for volume in broker["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    # rabbitmq.conf is read by the broker, and it points at the definitions file we mount.
    conf_target = next(t for t, s in mounts.items() if (REPO / s).resolve() == RABBITMQ_CONF)
    assert conf_target == "/etc/rabbitmq/rabbitmq.conf" or re.fullmatch(
        r"/etc/rabbitmq/conf\.d/[^/]+\.conf", conf_target
    ), conf_target
    definitions_source = mounts[conf["load_definitions"]]
    assert (REPO / definitions_source).resolve() == DEFINITIONS
    assert conf.get("loopback_users.guest") == "true"
    test = broker["healthcheck"]["test"]
    command = test[1:] if test[0] in ("CMD", "CMD-SHELL") else test
    joined = " ".join(command)
    assert "rabbitmq-diagnostics" in joined
    assert re.search(r"\b(ping|check_port_connectivity|check_running)\b", joined)
    published = {str(port).rsplit(":", 1)[-1] for port in broker["ports"]}
    assert {"5672", "15672"} <= published


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_builds_a_slim_non_root_image_of_the_project(dockerfile: Dockerfile) -> None:
    froms = dockerfile.all("FROM")
    assert froms[-1].split()[0] == "python:3.11-slim"
    users = dockerfile.all("USER")
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    install = dockerfile.index_of_last("RUN", "pip install")
    assert dockerfile.index_of_last("USER") > install  # installed as root, run as the user
    pip = dockerfile.instructions[install][1]
    assert re.search(r"pip install (\S+ )*\"?\.(\[postgres\])?\"?(\s|$)", pip), pip
    assert "[test" not in pip, "the image installs the test dependencies"
    extras = re.findall(r"pip install [^&;]*?\[([^\]]*)\]", pip)
    assert extras in ([], ["postgres"]), f"the image installs extras {extras} (test deps?)"
    copied = [rest.split()[:-1] for rest in dockerfile.all("COPY")]
    sources = {PurePosixPath(s).as_posix().rstrip("/") for group in copied for s in group}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    included = {name.rstrip("*") for name in packages["packages"]["find"]["include"]}
    assert {"bangui_geo", "shared", "services"} <= included
    assert {"pyproject.toml", *included} <= sources  # every installed package is in the image
    # /data exists and belongs to the user, so a fresh named volume on it is writable.
    setup = " ".join(dockerfile.all("RUN"))
    assert re.search(r"mkdir (-p )?/data\b", setup)
    assert re.search(rf"chown (-R )?{user}(:\S+)? /data\b", setup)


def test_app_healthchecks_ask_the_health_endpoint_on_the_metrics_port(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    env = " ".join(dockerfile.all("ENV"))
    port = re.search(r"GEO_METRICS_PORT=(\d+)", env)
    assert port, "the image does not enable /metrics and /health"
    assert "GEO_METRICS_HOST=0.0.0.0" in env
    for name in ("resolver", "timer", "persistence"):
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port.group(1)}/health" in test, name


def test_dockerignore_keeps_what_the_image_copies(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith(("#", "!"))
    ]
    assert {".venv", ".git", ".env", "data"} <= set(patterns)
    needed = [s for rest in dockerfile.all("COPY") for s in rest.split()[:-1]]
    for source in [*needed, "shared/settings.py", "services/resolver/__main__.py"]:
        path = source.rstrip("/")
        parents = [str(p) for p in PurePosixPath(path).parents if str(p) != "."]
        for pattern in patterns:
            bare = pattern.removeprefix("**/").rstrip("/")
            hit = any(fnmatch(candidate, bare) for candidate in [path, *parents])
            assert not hit, f".dockerignore pattern {pattern!r} excludes {source}"


# --- the broker definitions ---------------------------------------------------------------------


@dataclass
class _Recorded:
    # name -> (type, durable, auto_delete, internal, arguments)
    exchanges: dict[str, tuple[str, bool, bool, bool, dict[str, Any]]] = field(default_factory=dict)
    # name -> (durable, auto_delete, exclusive, arguments)
    queues: dict[str, tuple[bool, bool, bool, dict[str, Any]]] = field(default_factory=dict)
    # (source, destination, routing key, arguments as sorted items)
    bindings: set[tuple[str, str, str, str]] = field(default_factory=set)


class _RecordingChannel:
    """Stands in for an aio-pika channel and records what declare_topology declares."""

    def __init__(self) -> None:
        self.seen = _Recorded()

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: Any = None,
    ) -> str:
        kind = ExchangeType(type).value
        self.seen.exchanges[name] = (kind, durable, auto_delete, internal, dict(arguments or {}))
        return name

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        auto_delete: bool = False,
        exclusive: bool = False,
        arguments: Any = None,
    ) -> _RecordingQueue:
        self.seen.queues[name] = (durable, auto_delete, exclusive, dict(arguments or {}))
        return _RecordingQueue(name, self.seen)


@dataclass
class _RecordingQueue:
    name: str
    seen: _Recorded

    async def bind(self, exchange: str, routing_key: str = "", arguments: Any = None) -> None:
        args = json.dumps(dict(arguments or {}), sort_keys=True)
        self.seen.bindings.add((exchange, self.name, routing_key, args))


async def test_definitions_declare_exactly_the_topology_the_code_declares(
    definitions: dict[str, Any], compose: dict[str, Any]
) -> None:
    # The queue type the deployment runs with: the default unless compose or the image set it.
    queue_type: Any = Settings.model_fields["queue_type"].default
    for name in APP_SERVICES:
        queue_type = environment_of(compose["services"][name]).get("GEO_QUEUE_TYPE", queue_type)
    channel = _RecordingChannel()
    await declare_topology(channel, queue_type)  # type: ignore[arg-type]
    code = channel.seen
    assert code.queues, "declare_topology declared nothing"

    assert {v["name"] for v in definitions["vhosts"]} == {VHOST}
    for kind in ("exchanges", "queues", "bindings", "permissions", "topic_permissions"):
        assert {item["vhost"] for item in definitions[kind]} == {VHOST}, kind
    exchanges = {
        x["name"]: (x["type"], x["durable"], x["auto_delete"], x["internal"], x["arguments"])
        for x in definitions["exchanges"]
    }
    assert len(exchanges) == len(definitions["exchanges"])
    assert exchanges == code.exchanges
    # A definitions file cannot create an exclusive queue (it belongs to a connection).
    queues = {
        q["name"]: (q["durable"], q["auto_delete"], False, q["arguments"])
        for q in definitions["queues"]
    }
    assert len(queues) == len(definitions["queues"])
    assert queues == code.queues  # names, durable flags and arguments, values and types alike
    for name, (*_, arguments) in queues.items():  # True == 1 in Python, not to RabbitMQ
        for key, value in arguments.items():
            assert type(value) is type(code.queues[name][3][key]), (name, key)
    bindings = {
        (b["source"], b["destination"], b["routing_key"], json.dumps(b["arguments"]))
        for b in definitions["bindings"]
        if b["destination_type"] == "queue"
    }
    assert len(bindings) == len(definitions["bindings"])
    assert bindings == code.bindings


# What each user does on the broker, from the contract (README) and the services' bootstrap.
FLUSH_QUEUE = f"{topology.RESOLVER_FLUSH_PREFIX}3f9c2a1b7d4e.17"  # host.pid, one per replica
PUBLISHES = {
    "geo-resolver": {topology.UPSERT, topology.RESOLVED, topology.KNOWN},
    "geo-timer": {topology.FLUSH, topology.RE_RESOLVE},
    "geo-persistence": {topology.RETRY},
    PUBLISHER: {topology.IP_SEEN, topology.LOOKUP},
}
# Who answers requests: replies go to the default exchange (``amq.default`` for permissions).
ANSWERS = {"geo-resolver", "geo-persistence"}
CONSUMES: dict[str, list[topology.QueueSpec]] = {
    "geo-resolver": [topology.RESOLVER_IP_SEEN, topology.RESOLVER_RETRY, topology.RESOLVER_LOOKUP],
    "geo-timer": [],
    "geo-persistence": [
        topology.PERSISTENCE_UPSERT,
        topology.PERSISTENCE_RE_RESOLVE,
        topology.PERSISTENCE_KNOWN,
    ],
    PUBLISHER: [],
}
PRIVATE_QUEUES = {"geo-resolver": FLUSH_QUEUE, "geo-timer": topology.TIMER_LEADER_QUEUE}


def required_permissions(user: str) -> dict[str, set[str]]:
    """The resources each operation touches, after RabbitMQ's access-control table.

    The broker definitions own the topology: the services declare the exchanges and durable
    queues passively (no permission needed) and re-bind only the queues they consume, so each
    user may configure only what its service owns (its exclusive queues). RabbitMQ checks read
    on the queue and write on its dead-letter exchange only when a queue with a DLX is created
    (rabbit_channel, queue.declare), so those two are not needed, and not granted.
    """
    need: dict[str, set[str]] = {"configure": set(), "write": set(), "read": set()}
    if PUBLISHES[user]:
        need["write"].add(topology.EXCHANGE)  # basic.publish
    if user == PUBLISHER:
        return need  # publishes only (replies come by direct reply-to): nothing else
    if user in ANSWERS:
        need["write"].add("amq.default")
    consumed = {spec.name for spec in CONSUMES[user]}
    need["write"] |= consumed  # queue.bind of its own queues writes to them...
    need["read"] |= consumed  # ...basic.consume reads them...
    if consumed:
        need["read"].add(topology.EXCHANGE)  # ...and binding from bangui reads the exchange
        need["write"].add(topology.DEAD_LETTER_EXCHANGE)  # rejects are published to bangui.dlx
    private = PRIVATE_QUEUES.get(user)
    if private == FLUSH_QUEUE:  # declared, bound to geo.flush and consumed by each replica
        need["configure"].add(private)
        need["write"].add(private)
        need["read"].add(private)
    elif private is not None:  # the timer's leader lock: declared exclusive, nothing else
        need["configure"].add(private)
    return need


def required_topic_permissions(user: str) -> dict[tuple[str, str], set[str]]:
    """(exchange, write|read) -> routing keys: published, or bound (the binding key)."""
    need: dict[tuple[str, str], set[str]] = {
        (topology.EXCHANGE, "write"): set(PUBLISHES[user]),
        (topology.EXCHANGE, "read"): set(),
        (topology.DEAD_LETTER_EXCHANGE, "write"): set(),
        (topology.DEAD_LETTER_EXCHANGE, "read"): set(),
    }
    for spec in CONSUMES[user]:  # its own queues' bindings; a reject goes out under their key
        need[(topology.EXCHANGE, "read")] |= set(spec.routing_keys)
        need[(topology.DEAD_LETTER_EXCHANGE, "write")].add(spec.route)
    if user == "geo-resolver":
        need[(topology.EXCHANGE, "read")] |= set(topology.RESOLVER_FLUSH_KEYS)
        need[(topology.DEAD_LETTER_EXCHANGE, "write")] |= set(topology.RESOLVER_FLUSH_KEYS)
    return need


def resource_names() -> set[str]:
    """Every name a permission regex could be asked about, plus a few it must not grant."""
    queues = {q.name for q in [*topology.WORK_QUEUES, topology.DEAD_LETTER]}
    others = {"amq.default", "amq.topic", "geo.other", "bangui.other", "xbangui", "banguix"}
    return {
        topology.EXCHANGE,
        topology.DEAD_LETTER_EXCHANGE,
        FLUSH_QUEUE,
        topology.TIMER_LEADER_QUEUE,
        *queues,
        *others,
    }


def routing_keys() -> set[str]:
    keys = {k for q in [*topology.WORK_QUEUES, topology.DEAD_LETTER] for k in q.routing_keys}
    published = {k for keys in PUBLISHES.values() for k in keys}
    extra = {"", "#", "*", "ip.seen.x", "ip.*", "geo.*", "x"}
    return keys | published | set(topology.RESOLVER_FLUSH_KEYS) | extra


def granted(regex: str, universe: set[str]) -> set[str]:
    # RabbitMQ tests a permission with re:run, a search: the regexes must anchor themselves.
    return {name for name in universe if re.search(regex, name)}


def test_definitions_have_one_user_per_service_plus_publisher_and_admin(
    definitions: dict[str, Any],
) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    assert set(users) == set(DEV_PASSWORDS)
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256", name
        assert hash_matches(user["password_hash"], DEV_PASSWORDS[name]), name
        tags = user["tags"] if isinstance(user["tags"], list) else user["tags"].split(",")
        assert [t for t in tags if t] == (["administrator"] if name == ADMIN else []), name
    admin = next(p for p in definitions["permissions"] if p["user"] == ADMIN)
    assert (admin["configure"], admin["write"], admin["read"]) == (".*", ".*", ".*")


@pytest.mark.parametrize("user", [*SERVICE_USERS.values(), PUBLISHER])
def test_permissions_grant_each_user_exactly_what_it_needs(
    definitions: dict[str, Any], user: str
) -> None:
    (permission,) = [p for p in definitions["permissions"] if p["user"] == user]
    universe = resource_names()
    for kind, needed in required_permissions(user).items():
        assert granted(permission[kind], universe) == needed, f"{user} {kind}"


@pytest.mark.parametrize("user", [*SERVICE_USERS.values(), PUBLISHER])
def test_topic_permissions_limit_the_routing_keys_of_each_user(
    definitions: dict[str, Any], user: str
) -> None:
    mine = {t["exchange"]: t for t in definitions["topic_permissions"] if t["user"] == user}
    assert topology.EXCHANGE in mine, f"{user} may publish any routing key on bangui"
    (vhost_permission,) = [p for p in definitions["permissions"] if p["user"] == user]
    keys = routing_keys()
    for (exchange, kind), needed in required_topic_permissions(user).items():
        if exchange not in mine:
            # No topic permission means every key: only acceptable where the user can neither
            # publish to (write) nor bind from (read) the exchange at all.
            assert not re.search(vhost_permission[kind], exchange), (user, exchange, kind)
            continue
        assert granted(mine[exchange][kind], keys) == needed, f"{user} {exchange} {kind}"


def test_hash_password_script_writes_rabbitmq_hashes() -> None:
    spec = importlib.util.spec_from_file_location("hash_password", HASH_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    salt = b"\x01\x02\x03\x04"
    expected = base64.b64encode(salt + hashlib.sha256(salt + b"correct horse").digest())
    assert module.password_hash("correct horse", salt) == expected.decode()
    assert hash_matches(module.password_hash("ünïcode"), "ünïcode")
    assert not hash_matches(module.password_hash("one"), "two")


def _walk(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)


def test_only_marked_development_passwords_are_in_the_repository(
    raw_compose: dict[str, Any],
) -> None:
    defaults = re.findall(r"_PASSWORD:-([^}]*)\}", " ".join(_walk(raw_compose)))
    users = [*SERVICE_USERS.values(), PUBLISHER]  # the publisher's: the agent profile's
    expected = [*(DEV_PASSWORDS[u] for u in users), "dev-only-geo-postgres"]
    assert sorted(defaults) == sorted(expected)
    assert all(d.startswith("dev-only-") for d in defaults)


# --- the cluster profile ------------------------------------------------------------------------


def read_conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format) as key -> value."""
    return {
        key.strip(): value.strip()
        for key, _, value in (
            line.partition("=")
            for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    }


def test_cluster_profile_adds_three_nodes_that_form_one_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = {name: services[name] for name in CLUSTER_NODES}
    assert all(node["profiles"] == ["cluster"] for node in nodes.values())
    conf = read_conf(CLUSTER_CONF)
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = [v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")]
    assert sorted(listed) == sorted(f"rabbit@{node['hostname']}" for node in nodes.values())
    # Keys RabbitMQ before 3.13 does not know stop it at boot: they live in their own file.
    assert not any(key.startswith("quorum_queue.continuous_membership") for key in conf)
    reconciliation = read_conf(RECONCILIATION_CONF)
    assert reconciliation["quorum_queue.continuous_membership_reconciliation.enabled"] == "true"
    assert (
        reconciliation["quorum_queue.continuous_membership_reconciliation.target_group_size"] == "3"
    )
    assert read_conf(NO_RECONCILIATION_CONF) == {}
    cookies = {environment_of(node)["RABBITMQ_ERLANG_COOKIE"] for node in nodes.values()}
    assert len(cookies) == 1, "the nodes need one Erlang cookie"
    assert next(iter(cookies)).startswith("dev-only-")
    base = read_conf(RABBITMQ_CONF)
    data_volumes = set()
    host_ports = {str(p).rsplit(":", 2)[-2] for p in services["rabbitmq"]["ports"]}
    for name, node in nodes.items():
        assert node["image"] == services["rabbitmq"]["image"], name
        mounts = {target: source for source, target, *_ in (v.split(":") for v in node["volumes"])}
        conf_d = {t: (REPO / s).resolve() for t, s in mounts.items() if t.endswith(".conf")}
        assert conf_d == {
            "/etc/rabbitmq/conf.d/90-bangui.conf": RABBITMQ_CONF,
            "/etc/rabbitmq/conf.d/91-cluster.conf": CLUSTER_CONF,  # read after 90-bangui.conf
            "/etc/rabbitmq/conf.d/92-reconciliation.conf": RECONCILIATION_CONF,  # the default
        }, name
        assert (REPO / mounts[base["load_definitions"]]).resolve() == CLUSTER_DEFINITIONS
        data = mounts["/var/lib/rabbitmq"]
        assert data in compose["volumes"], f"{name}: its data is not on a named volume"
        data_volumes.add(data)
        assert "check_port_connectivity" in " ".join(node["healthcheck"]["test"])
        ports = {str(p).rsplit(":", 2)[-2] for p in node["ports"]}
        assert not ports & host_ports, f"{name} publishes a host port already taken"
        host_ports |= ports
    assert len(data_volumes) == len(nodes), "two nodes share a data volume"


async def test_cluster_definitions_are_the_definitions_with_quorum_queues(
    definitions: dict[str, Any],
) -> None:
    cluster = json.loads(CLUSTER_DEFINITIONS.read_text())
    channel = _RecordingChannel()
    await declare_topology(channel, "quorum")  # type: ignore[arg-type]
    declared = {name: args for name, (_, _, _, args) in channel.seen.queues.items()}
    assert {q["name"]: q["arguments"] for q in cluster["queues"]} == declared
    # Users, hashes, permissions, exchanges and bindings: those of the single broker.
    for queue in cluster["queues"]:
        assert queue["arguments"].pop("x-queue-type") == "quorum"
    assert cluster == definitions


def test_cluster_env_points_every_service_at_the_three_nodes(raw_compose: dict[str, Any]) -> None:
    env = read_env_file(CLUSTER_ENV)
    assert env["GEO_QUEUE_TYPE"] == "quorum"
    compose = interpolated(raw_compose, env)
    hostnames = sorted(compose["services"][node]["hostname"] for node in CLUSTER_NODES)
    first_nodes = set()
    for name in APP_SERVICES:
        service_env = environment_of(compose["services"][name])
        settings = Settings(
            amqp_url=service_env["GEO_AMQP_URL"], queue_type=service_env["GEO_QUEUE_TYPE"]
        )
        assert settings.queue_type == "quorum"
        urls = [urlsplit(url) for url in settings.amqp_urls]
        assert sorted(u.hostname or "" for u in urls) == hostnames, name
        assert {(u.username, u.password) for u in urls} == {
            (SERVICE_USERS[name], DEV_PASSWORDS[SERVICE_USERS[name]])
        }
        assert {(u.port, unquote(u.path[1:])) for u in urls} == {(5672, VHOST)}
        first_nodes.add(urls[0].hostname)
    assert len(first_nodes) == len(APP_SERVICES), "the services all start on one node"
    # Without the file, each service keeps its one URL on the single broker, classic queues.
    default = interpolated(raw_compose, {})
    for name in APP_SERVICES:
        service_env = environment_of(default["services"][name])
        assert urlsplit(service_env["GEO_AMQP_URL"]).hostname == "rabbitmq"
        assert service_env["GEO_QUEUE_TYPE"] == "classic"
