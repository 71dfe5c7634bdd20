"""The published OpenAPI schema is what the server does: schemathesis, every check, the real app.

Schemathesis reads /openapi.json from the app serving the tiny atlas with its real models, then runs
all its phases (coverage, fuzzing, and stateful sequences that feed one response's SAE ids, latents
and accessions into the next request; the examples phase has none to run) and every check it ships
against each response: status codes, media types, headers and bodies must be the documented ones;
data the schema allows must be accepted and data it forbids rejected; no 5xx; nothing slower than
10 s.  Any finding fails the test.

It runs through schemathesis's engine (what ``st run`` does) rather than ``@schema.parametrize``:
the app needs the session's tiny atlas, and ``schemathesis.pytest.from_fixture`` renames the test
through ``Function._nodeid``, which pytest 9 no longer has.
"""

from __future__ import annotations

import collections
import time
from email.parser import BytesParser
from email.policy import HTTP

import jsonschema_rs
import schemathesis
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.engine import Status, events, from_schema
from schemathesis.python.asgi import shutdown_lifespans

from plmscope.settings import Settings
from plmscope.web.app import create_app

SEED = 14
MAX_EXAMPLES = 40  # per operation and phase: ~2,200 requests, about half a minute on two cores


def _config() -> SchemathesisConfig:
    load_all_checks()
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        # deterministic, and no example database: a run never depends on an earlier one
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"enabled": True},
        "checks": {"enabled": True, "max_response_time": 10.0},  # seconds; a loaded CI machine stays well under
    })


def _sent_form(response) -> dict[str, str]:
    """The multipart form as the server reads it: the last value of each field, a file part as a string."""
    request = response.request
    body = request.body.encode() if isinstance(request.body, str) else request.body
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    fields = {}
    for part in BytesParser(policy=HTTP).parsebytes(head + body).iter_parts():
        name = part.get_param("name", header="content-disposition")
        is_file = part.get_filename() is not None
        fields[name] = "" if is_file else part.get_payload(decode=True).decode(errors="replace")
    return fields


def _register_multipart_recheck(schema, form_schema: dict) -> list[str]:
    """negative_data_rejection re-reads a form as sent, but in schemathesis 4.32.5 a form with a file
    part cannot be validated (jsonschema_rs raises on its bytes) and counts as invalid; so a text field
    mutated into a value that reads back as valid text (`false` sent as the sequence FALSE) is reported
    as invalid data accepted.  Re-check such a form as sent, the file as the string the schema says it
    is; the finding stands unless that form is valid."""
    validator = jsonschema_rs.Draft202012Validator(form_schema)
    valid_as_sent: list[str] = []

    @schema.hook
    def filter_failure(context, failure, case, response):
        if not isinstance(failure, AcceptedNegativeData) or case.media_type != "multipart/form-data":
            return True
        form = _sent_form(response)
        if not any(p.get("format") == "binary" and n in form for n, p in form_schema["properties"].items()):
            return True  # no file part: schemathesis's own re-check applies
        for name, prop in form_schema["properties"].items():
            if prop.get("type") == "integer" and name in form:
                try:
                    form[name] = int(form[name])
                except ValueError:
                    return True
        if validator.is_valid(form):
            valid_as_sent.append(failure.message)
            return False
        return True

    return valid_as_sent


def _describe(name: str, label: str, failure, code: str, response) -> str:
    got = f"{response.status_code} {response.headers.get('content-type', [''])[0]}: {response.content[:300]!r}" \
        if response is not None else "no response"
    return f"[{name}] {label}: {failure.title}\n  {failure.message.strip()[:600]}\n  got {got}\n  {code[:800]}"


def test_every_schemathesis_check_passes(tiny_atlas):
    # no rate limit: thousands of requests from one client would otherwise mostly see 429
    app = create_app(Settings(atlas=tiny_atlas.path, device="cpu", rate_limit_per_minute=0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=_config())
    valid_as_sent = _register_multipart_recheck(
        schema, app.openapi()["components"]["schemas"]["Body_infer_form_infer_post"])
    findings: dict[tuple, str] = {}
    errors: list[str] = []
    checks_run: collections.Counter = collections.Counter()
    statuses: dict[str, set[int]] = collections.defaultdict(set)
    n_requests = 0
    phases: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
                recorder = event.recorder
                n_requests += len(recorder.interactions)
                for case_id, interaction in recorder.interactions.items():
                    node = recorder.cases.get(case_id)
                    if node is not None and interaction.response is not None:
                        statuses[node.value.operation.label].add(interaction.response.status_code)
                for case_id, nodes in recorder.checks.items():
                    for check in nodes:
                        checks_run[check.name] += 1
                        if check.status == Status.FAILURE:
                            info = check.failure_info
                            interaction = recorder.interactions.get(case_id)
                            key = (check.name, recorder.label, info.failure.title)
                            findings.setdefault(key, _describe(
                                check.name, recorder.label, info.failure, info.code_sample,
                                interaction.response if interaction is not None else None))
            elif isinstance(event, events.NonFatalError):
                errors.append(f"{event.label}: {event.value!r}")
            elif isinstance(event, events.FatalError):
                errors.append(f"schemathesis failed: {event.exception!r}")
            elif isinstance(event, events.PhaseFinished):
                phases[event.phase.name.value] = event.status.value
    finally:
        shutdown_lifespans()
    elapsed = time.monotonic() - t0
    print(f"\nschemathesis: {n_requests} requests, {sum(checks_run.values())} checks in {elapsed:.0f} s "
          f"({len(valid_as_sent)} multipart finding(s) valid as sent); phases {phases}; checks {dict(checks_run)}")

    assert not errors, "\n".join(errors)
    assert not findings, f"{len(findings)} finding(s):\n\n" + "\n\n".join(findings.values())
    # the run really ran: every check shipped with schemathesis, every phase, every operation
    assert set(CHECKS.get_all_names()) | {"max_response_time"} <= set(checks_run), set(checks_run)
    for phase in ("coverage", "fuzzing", "stateful"):
        assert phases.get(phase) == "success", phases
    documented = {f"{method.upper()} {path}" for path, ops in app.openapi()["paths"].items() for method in ops}
    assert documented <= set(statuses), documented - set(statuses)
    # and reached real atlas data, not only 4xx: each page, twin and export answered 2xx or 3xx at least once
    unreached = sorted(op for op, codes in statuses.items() if not any(200 <= c < 400 for c in codes))
    assert not unreached, unreached
