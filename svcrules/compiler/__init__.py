"""The library entry point: objects in, ruleset out.

Parsing, validation (pydantic), planning and rendering (Jinja2) are imported where they
are used: a cron run whose inputs did not change needs only ``Job.digest``, and should
not pay a tenth of a second of imports for what it never calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from svcrules.errors import InputError, OnInvalid, Problem
from svcrules.inputs.overrides import Overrides
from svcrules.inputs.read import Source, read_sources
from svcrules.progress import amount, phase
from svcrules.render.digest import hash_text

if TYPE_CHECKING:
    from svcrules.compiler.compile_cache import Cache
    from svcrules.inputs.load import Inputs
    from svcrules.inputs.model import NodeConfig
    from svcrules.plan.node import NodePlan


@dataclass(frozen=True)
class Ruleset:
    """A compiled ruleset: the plan it came from and its renderings.

    ``skipped`` lists, one per object, what ``on_invalid="skip"`` left out: invalid
    Services and EndpointSlices (in input order), then Services that lost a conflict
    over a frontend or NodePort. Always empty with ``on_invalid="fail"``."""

    plan: NodePlan
    skipped: tuple[Problem, ...] = ()
    # What the next compile of changed inputs can reuse (Job.compile with a cache).
    next_cache: Cache | None = field(default=None, compare=False, repr=False)
    # plan.node.port_digest of ports by id(), where the compile cache knew them.
    port_digests: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    # The EndpointSlices that count (a Service's, not hidden by a label) whose
    # endpoints.kubernetes.io/last-change-trigger-time annotation is set: namespace/name
    # -> its value (svcrules.kernel.history: network programming latency).
    triggers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _texts: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def text(self, backend: str) -> str:
        """The ruleset as the named backend loads it (svcrules.render.backends), rendered
        once."""
        if backend not in self._texts:
            from svcrules.render.backends import RENDERERS

            try:
                render = RENDERERS[backend]
            except KeyError:
                names = ", ".join(RENDERERS)
                raise ValueError(f"unknown backend {backend!r}: one of {names}") from None
            with phase(f"rendering {backend} rules") as p:
                self._texts[backend] = text = render.text(self.plan)
                p.detail = f"{text.count(chr(10)):,} lines"
        return self._texts[backend]

    @property
    def nft(self) -> str:
        return self.text("nftables")

    @property
    def iptables(self) -> str:
        """Both families' iptables-restore inputs (the iptables backend)."""
        return self.text("iptables")

    @cached_property
    def json(self) -> str:
        """The nftables ruleset in libnftables JSON (as ``nft -j list`` prints it)."""
        from svcrules.render.backends import RENDERERS

        render = RENDERERS["nftables"].json
        assert render is not None
        with phase("rendering libnftables JSON"):
            return render(self.plan)


def compile(inputs: Inputs, node: NodeConfig, on_invalid: OnInvalid = "fail") -> Ruleset:
    """Compile loaded objects for one node. With ``on_invalid="skip"``, Services that
    conflict are left out (the oldest keeps the claim) instead of failing, and
    reported with those ``inputs.skipped`` already holds."""
    from svcrules.plan.resolve import resolve

    _check_mode(on_invalid)
    triggers = trigger_times(inputs)
    with phase("planning Services") as p:
        p.detail = f"{len(inputs.services):,} Services"
        if on_invalid == "fail":
            return Ruleset(resolve(inputs, node), triggers=triggers)
        conflicts: list[Problem] = []
        plan = resolve(inputs, node, conflicts)
    return Ruleset(plan, tuple(inputs.skipped) + tuple(conflicts), triggers=triggers)


def trigger_times(inputs: Inputs) -> dict[str, str]:
    """Ruleset.triggers of loaded objects."""
    from svcrules.plan.resolve import ignored_slice, slice_service

    return {
        f"{sl.metadata.namespace}/{sl.metadata.name}": sl.metadata.trigger_time
        for sl in inputs.slices
        if sl.metadata.trigger_time and slice_service(sl) is not None and ignored_slice(sl) is None
    }


def _check_mode(on_invalid: str) -> None:
    if on_invalid not in ("fail", "skip"):
        raise ValueError(f"on_invalid must be 'fail' or 'skip', not {on_invalid!r}")


@dataclass(frozen=True)
class Job:
    """Inputs read but not yet compiled: their digest decides whether a run can
    skip compiling (nothing changed since the last apply)."""

    sources: tuple[Source, ...]
    config: tuple[Source, ...]
    overrides: Overrides
    # False refuses inputs without a single Service: on a node, an empty or failed
    # source must never read as "remove every Service".
    allow_empty: bool = True
    # "skip": invalid and conflicting objects are left out (Ruleset.skipped) instead of
    # failing the run; part of the digest, since the result differs.
    on_invalid: OnInvalid = "fail"

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(code_digest().encode())
        for group in (self.sources, self.config):
            h.update(b"\x00group")
            for src in group:
                h.update(b"\x00" + src.path.encode() + b"\x00")
                hash_text(h, src.text)
        h.update(repr(self.overrides).encode())
        h.update(f"\x00{self.allow_empty}\x00{self.on_invalid}".encode())
        return h.hexdigest()[:32]

    def compile(
        self,
        backend: str = "nftables",
        on_invalid: OnInvalid | None = None,
        cache: Cache | None = None,
        keep: bool = False,
    ) -> Ruleset:
        """Parse, validate and compile. ``on_invalid="skip"``: invalid Services and
        EndpointSlices and Services losing a conflict are left out and listed in
        ``Ruleset.skipped``; a document that cannot be parsed, any problem with the
        NodeConfig, and inputs beyond the limits still fail (InputError).

        With ``keep`` (or a ``cache`` from an earlier compile), the result carries a
        ``next_cache``, and with ``cache`` only what changed is validated and planned
        again (svcrules.compiler.compile_cache); the ruleset is the same either way."""
        from svcrules.compiler.compile_cache import NotCacheable, compile_plan
        from svcrules.compiler.memory import no_cyclic_gc
        from svcrules.inputs.config import node_config
        from svcrules.inputs.load import load_sources

        on_invalid = on_invalid or self.on_invalid
        _check_mode(on_invalid)
        with no_cyclic_gc():
            if keep or cache is not None:
                try:
                    done = compile_plan(
                        self.sources,
                        self.config,
                        self.overrides,
                        on_invalid,
                        self.allow_empty,
                        code_digest(),
                        cache,
                    )
                except NotCacheable:
                    pass
                else:
                    ruleset = Ruleset(
                        done.plan, done.skipped, done.cache, done.port_digests, done.triggers
                    )
                    ruleset = leave_out_unsupported(ruleset, backend, on_invalid)
                    _ = ruleset.text(backend)
                    return ruleset
            with phase("validating objects") as p:
                inputs = load_sources(self.sources, on_invalid)
                config_inputs = load_sources(self.config) if self.config else None
                p.detail = (
                    f"{len(inputs.services):,} Services, {len(inputs.slices):,} EndpointSlices"
                )

            empty = [] if self.allow_empty else empty_problems(self.sources, inputs)
            try:
                node = node_config(inputs, config_inputs, self.overrides)
            except InputError as exc:
                raise InputError(exc.problems + empty) from None
            if empty:
                raise InputError(empty)
            ruleset = leave_out_unsupported(compile(inputs, node, on_invalid), backend, on_invalid)
            # The validated objects are not needed to render: freed first, the largest
            # compiles peak lower.
            del inputs, config_inputs
            _ = ruleset.text(backend)  # render here too: it allocates as much as loading
        return ruleset


def leave_out_unsupported(ruleset: Ruleset, backend: str, on_invalid: OnInvalid) -> Ruleset:
    """With ``on_invalid="skip"``, the ruleset without the Services the backend cannot
    spell (the iptables backend and Maglev), each reported in ``skipped``: one such
    Service must not stop a node's updates. With "fail" the backend refuses them."""
    from dataclasses import replace

    from svcrules.render.backends import RENDERERS

    renderer = RENDERERS.get(backend)
    if on_invalid != "skip" or renderer is None or renderer.unsupported is None:
        return ruleset
    refused = dict(renderer.unsupported(ruleset.plan))
    if not refused:
        return ruleset
    services = set(refused)
    plan = ruleset.plan
    families = tuple(
        replace(f, ports=tuple(p for p in f.ports if p.service not in services))
        for f in plan.families
    )
    health = tuple(h for h in plan.health_checks if h.service not in services)
    left_out = tuple(
        Problem(None, "", f"Service {svc}: left out: {why}") for svc, why in sorted(refused.items())
    )
    return Ruleset(
        replace(plan, families=families, health_checks=health),
        ruleset.skipped + left_out,
        ruleset.next_cache,
        ruleset.port_digests,
        ruleset.triggers,
    )


EMPTY_HINT = (
    "refusing to program a node with no Services (that would remove every Service); "
    "if the inputs come from a pipe, did the command before it fail? (use 'set -o pipefail'). "
    "Pass --allow-empty if no Services is really what you want"
)


def empty_problems(sources: Sequence[Source], inputs: Inputs) -> list[Problem]:
    """Why inputs that hold no Service at all are refused, naming the empty sources."""
    if inputs.services:
        return []
    problems = [
        Problem(None, "", f"{s.path}: empty input (nothing but white space)")
        for s in sources
        if not s.text.strip()
    ]
    if not sources:
        problems.append(Problem(None, "", "no input files found"))
    problems.append(Problem(None, "", EMPTY_HINT))
    return problems


def prepare(
    paths: Sequence[str],
    config: str | None = None,
    overrides: Overrides | None = None,
    stdin: TextIO | None = None,
    allow_empty: bool = True,
    on_invalid: OnInvalid = "fail",
) -> Job:
    """Read ``paths`` (and ``config``) without parsing them yet."""
    _check_mode(on_invalid)
    with phase("reading inputs") as p:
        job = Job(
            tuple(read_sources(paths, stdin)),
            tuple(read_sources([config], stdin)) if config else (),
            overrides or Overrides(),
            allow_empty,
            on_invalid,
        )
        files = len(job.sources) + len(job.config)
        size = sum(len(s.text) for s in (*job.sources, *job.config))
        p.detail = f"{files} {'file' if files == 1 else 'files'}, {amount(size)}"
    return job


def compile_paths(
    paths: Sequence[str],
    config: str | None = None,
    overrides: Overrides | None = None,
    stdin: TextIO | None = None,
    backend: str = "nftables",
    allow_empty: bool = True,
    on_invalid: OnInvalid = "fail",
) -> Ruleset:
    """Load ``paths`` (and ``config``), find the NodeConfig and compile (see
    ``Job.compile`` for ``on_invalid``)."""
    return prepare(paths, config, overrides, stdin, allow_empty).compile(backend, on_invalid)


@cache
def code_digest() -> str:
    """A digest of svcrules' own code and templates: a new version compiles anew."""
    from svcrules.render.templates import template_dir

    h = hashlib.sha256()
    roots = [Path(__file__).resolve().parents[1], template_dir()]
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in (".py", ".j2"):
                h.update(f.name.encode() + b"\x00" + f.read_bytes())
    return h.hexdigest()
