"""The input schema: the parts of Kubernetes objects that svcrules reads.

Models accept what the API server returns (unknown fields are ignored, defaults
are the API's) and reject what cannot be programmed. Addresses are stored in
canonical form so that every later stage can compare them as strings. Integers
are strict where the API has integers: ``port: true`` is not port 1.

NodeConfig is svcrules' own kind: it forbids unknown fields, so that a typo
(``clusterCIDR:``) is an error instead of a silently missing setting.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Required

from pydantic import (
    AfterValidator,
    AliasPath,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from typing_extensions import TypedDict

from svcrules.inputs.addr import canonical_cidr, canonical_ip, family_of
from svcrules.inputs.owned import reserved_message

Protocol = Literal["TCP", "UDP", "SCTP"]


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


IP = Annotated[str, AfterValidator(canonical_ip)]
CIDR = Annotated[str, BeforeValidator(_strip), AfterValidator(canonical_cidr)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
ProtocolField = Annotated[Protocol, BeforeValidator(_upper)]


class K8sModel(BaseModel):
    """Kubernetes spelling (camelCase), unknown fields ignored."""

    model_config = ConfigDict(
        extra="ignore", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


# Kubernetes object names (DNS subdomains) and namespaces (DNS labels). Checked because
# names end up in keys like namespace/name:port, which must stay unambiguous.
_DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# kube-proxy watches Services and EndpointSlices through one label selector that leaves
# out every object carrying either label, whatever its value (SEMANTICS.md section 2).
PROXY_SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")


class ObjectMeta(K8sModel):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_NAME)]
    namespace: Annotated[str, Field(max_length=63, pattern=_DNS_NAME)] = "default"
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _none_labels(cls, value: Any) -> Any:
        return {} if value is None else value

    def skip_label(self) -> str | None:
        """The label that hides this object from kube-proxy, and so from svcrules."""
        return next((k for k in PROXY_SKIP_LABELS if k in self.labels), None)


# How a Service's endpoints are chosen (svcrules/plan/balancing.py): per Service by
# annotation, per node by NodeConfig spec.loadBalancing.
LOAD_BALANCING = "svcrules.io/load-balancing"
Algorithm = Literal["random", "maglev"]


class ServiceMeta(ObjectMeta):
    # Decides which of two Services claiming one frontend keeps it (on_invalid="skip").
    creation_timestamp: datetime | None = None
    # Of all annotations, only the one svcrules reads is kept.
    load_balancing: Algorithm | None = Field(
        default=None, validation_alias=AliasPath("annotations", LOAD_BALANCING)
    )

    @field_validator("creation_timestamp", mode="before")
    @classmethod
    def _empty_timestamp(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("creation_timestamp", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # YAML reads an unquoted time without zone as naive: the API's times are UTC.
        return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value


def _port_name(value: Any) -> Any:
    """A port name: None reads as unnamed; a name must be a DNS label (it ends up in keys
    like namespace/name:port, which must stay unambiguous)."""
    if value is None:
        return ""
    if isinstance(value, str) and value and not _PORT_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid port name (lower-case letters, digits, '-')")
    return value


PortName = Annotated[str, BeforeValidator(_port_name)]


class ServicePort(K8sModel):
    name: PortName = ""
    protocol: ProtocolField = "TCP"
    port: Port
    target_port: StrictInt | str | None = None
    node_port: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None


class ClientIPConfig(K8sModel):
    timeout_seconds: Annotated[StrictInt, Field(ge=1, le=86400)] = 10800


class SessionAffinityConfig(K8sModel):
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


class ServiceSpec(K8sModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    external_ips: list[IP] = Field(default_factory=list, alias="externalIPs")
    load_balancer_source_ranges: list[CIDR] = Field(default_factory=list)
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    # Where load balancers probe the node for an externalTrafficPolicy Local Service
    # (``svcrules serve``); 0 or unset: none.
    health_check_node_port: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None
    selector: dict[str, str] | None = None
    publish_not_ready_addresses: bool = False
    traffic_distribution: str | None = None

    @field_validator(
        "cluster_ips",
        "ports",
        "external_ips",
        "load_balancer_source_ranges",
        "ip_families",
        mode="before",
    )
    @classmethod
    def _none_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("external_traffic_policy", mode="before")
    @classmethod
    def _legacy_etp(cls, value: Any) -> Any:
        # "Global" is the pre-1.20 spelling of "Cluster"; the API still accepts it.
        return "Cluster" if value in (None, "Global") else value

    @field_validator("internal_traffic_policy", "session_affinity", mode="before")
    @classmethod
    def _none_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            return "Cluster" if info.field_name == "internal_traffic_policy" else "None"
        return value

    @field_validator("cluster_ip", mode="after")
    @classmethod
    def _check_cluster_ip(cls, value: str | None) -> str | None:
        if value in (None, "", "None"):
            return value
        return canonical_ip(value)

    @field_validator("cluster_ips", mode="after")
    @classmethod
    def _check_cluster_ips(cls, value: list[str]) -> list[str]:
        if value == ["None"]:
            return value
        out = [canonical_ip(v) for v in value]
        families = [family_of(v) for v in out]
        if len(set(families)) != len(families):
            raise ValueError("at most one cluster IP per family")
        return out

    def all_cluster_ips(self) -> list[str]:
        """clusterIPs if set (it includes clusterIP), else the legacy single field."""
        if self.cluster_ips:
            return [] if self.cluster_ips == ["None"] else list(self.cluster_ips)
        if self.cluster_ip in (None, "", "None"):
            return []
        return [self.cluster_ip]

    def is_headless(self) -> bool:
        return self.cluster_ip == "None" or self.cluster_ips == ["None"]

    def affinity_timeout(self) -> int | None:
        if self.session_affinity != "ClientIP":
            return None
        cfg = self.session_affinity_config
        if cfg is None or cfg.client_ip is None:
            return 10800
        return cfg.client_ip.timeout_seconds


class LoadBalancerIngress(K8sModel):
    ip: IP | None = None
    hostname: str | None = None
    ip_mode: Literal["VIP", "Proxy"] | None = None


class LoadBalancerStatus(K8sModel):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)

    @field_validator("ingress", mode="before")
    @classmethod
    def _none_list(cls, value: Any) -> Any:
        return [] if value is None else value


class ServiceStatus(K8sModel):
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)


class Service(K8sModel):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Service"] = "Service"
    metadata: ServiceMeta
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @model_validator(mode="after")
    def _check_ports(self) -> Service:
        if self.spec.type == "ExternalName" or self.is_skipped_by_label():
            return self
        seen: set[tuple[int, str]] = set()
        for i, port in enumerate(self.spec.ports):
            key = (port.port, port.protocol)
            if key in seen:
                raise ValueError(f"spec.ports[{i}]: duplicate port {port.port}/{port.protocol}")
            seen.add(key)
            if len(self.spec.ports) > 1 and not port.name:
                raise ValueError(f"spec.ports[{i}].name: required when a Service has several ports")
        return self

    def is_skipped_by_label(self) -> bool:
        return self.metadata.skip_label() is not None


# Endpoints are the bulk of any large input (hundreds of thousands), so they are
# TypedDicts: pydantic still checks every field, three times faster than models.
# Keys keep the API's spelling.


class EndpointConditions(TypedDict, total=False):
    ready: bool | None
    serving: bool | None
    terminating: bool | None


class HintName(TypedDict):
    name: str


class EndpointHints(TypedDict, total=False):
    forZones: list[HintName] | None
    forNodes: list[HintName] | None


class Endpoint(TypedDict, total=False):
    addresses: Required[Annotated[list[str], Field(min_length=1)]]
    conditions: EndpointConditions | None
    nodeName: str | None
    zone: str | None
    hints: EndpointHints | None


# The EndpointSlice controller's time of the change that caused a slice's last update
# (RFC 3339); kube-proxy measures network programming latency from it.
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


def _annotation_text(value: Any) -> str:
    """An annotation's value, or "" for anything but a string (never an error: only a
    metric reads it)."""
    return value if isinstance(value, str) else ""


# An EndpointSlice's endpoints' weight (0 = drain: no new connections). Cilium's
# spelling is accepted too, so that one set of manifests serves both.
WEIGHT = "svcrules.io/weight"
CILIUM_WEIGHT = "service.cilium.io/weight"
DEFAULT_WEIGHT = 100  # Cilium's default: a canary slice of weight 10 gets 10/110


def _weight(value: Any) -> Any:
    """An annotation's text as a weight: annotations are strings ("90"); a YAML integer
    is accepted too, a boolean or anything else is not."""
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise ValueError(f"{value!r} is not a weight (an integer from 0 to 65535)")
        return int(text)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a weight (an integer from 0 to 65535)")
    return value


Weight = Annotated[StrictInt, BeforeValidator(_weight), Field(ge=0, le=65535)]


class SliceMeta(ObjectMeta):
    # Of all annotations, only those svcrules reads are kept (others, such as kubectl's
    # last-applied-configuration, can be large).
    trigger_time: Annotated[str, BeforeValidator(_annotation_text)] = Field(
        default="", validation_alias=AliasPath("annotations", TRIGGER_TIME)
    )
    weight: Weight | None = Field(default=None, validation_alias=AliasPath("annotations", WEIGHT))
    cilium_weight: Weight | None = Field(
        default=None, validation_alias=AliasPath("annotations", CILIUM_WEIGHT)
    )

    @property
    def endpoint_weight(self) -> int:
        """The weight of this slice's endpoints: svcrules' annotation, else Cilium's."""
        if self.weight is not None:
            return self.weight
        return DEFAULT_WEIGHT if self.cilium_weight is None else self.cilium_weight


# Conditions seen, by value: a handful of combinations, shared by every endpoint.
_CONDITIONS: dict[tuple[tuple[str, Any], ...], EndpointConditions] = {}


class EndpointPort(K8sModel):
    name: PortName = ""
    protocol: ProtocolField = "TCP"
    port: Port | None = None


class EndpointSlice(K8sModel):
    api_version: Literal["discovery.k8s.io/v1"] = "discovery.k8s.io/v1"
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    metadata: SliceMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @field_validator("endpoints", "ports", mode="before")
    @classmethod
    def _none_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("endpoints", mode="after")
    @classmethod
    def _share_repeats(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Endpoints are the bulk of a large input and repeat themselves: one node name
        for many, and nearly all share one set of conditions. Equal values become one
        object (nothing changes an Endpoint once validated), which keeps a
        50,000-Service compile about 150 MB smaller."""
        for ep in endpoints:
            node = ep.get("nodeName")
            if node:
                ep["nodeName"] = sys.intern(node)
            conditions = ep.get("conditions")
            if conditions:
                key = tuple(conditions.items())
                ep["conditions"] = _CONDITIONS.setdefault(key, conditions)
        return endpoints

    @model_validator(mode="after")
    def _check_addresses(self) -> EndpointSlice:
        if self.address_type == "FQDN":
            return self
        want = 4 if self.address_type == "IPv4" else 6
        for i, ep in enumerate(self.endpoints):
            for j, address in enumerate(ep["addresses"]):
                try:
                    canonical = canonical_ip(address)
                except ValueError as exc:
                    raise ValueError(f"endpoints[{i}].addresses[{j}]: {exc}") from None
                if family_of(canonical) != want:
                    raise ValueError(
                        f"endpoints[{i}].addresses[{j}]: {address!r} is not an "
                        f"{self.address_type} address (addressType is {self.address_type})"
                    )
        return self

    def service_name(self) -> str | None:
        return self.metadata.labels.get("kubernetes.io/service-name")


_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class OwnModel(K8sModel):
    """svcrules' own kinds: unknown fields are errors (load.py names the closest)."""

    model_config = ConfigDict(extra="forbid")


# Cilium's Maglev table sizes (docs.cilium.io, "Maglev Consistent Hashing"): primes,
# each about twice the one before. svcrules picks the default from them.
MAGLEV_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _table_size(value: int | None) -> int | None:
    if value is None:
        return value
    low, high = MAGLEV_SIZES[0], MAGLEV_SIZES[-1]
    if not low <= value <= high or not _is_prime(value):
        sizes = ", ".join(map(str, MAGLEV_SIZES))
        raise ValueError(f"{value} is not a prime from {low} to {high} (for example {sizes})")
    return value


def _seed(value: Any) -> Any:
    """A 32-bit seed written as a hex string ("0x5eed1234" or "5eed1234"); jhash takes
    32 bits. A number is refused: YAML reads an unquoted 0x10 and 16 as the same number,
    so two nodes whose files differ only in quoting would hash differently."""
    if value is None:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"{value} is a number: write the seed as a quoted hex string, such as "
            f'"0x{value:x}" (YAML reads an unquoted 0x10 and 16 alike)'
        )
    if not isinstance(value, str) or not re.fullmatch(r"(0[xX])?[0-9a-fA-F]{1,8}", value.strip()):
        raise ValueError(f'{value!r} is not a 32-bit seed in hex (such as "0x5eed1234")')
    return f"0x{int(value.strip(), 16):x}"  # one spelling: nft's


class MaglevConfig(OwnModel):
    """spec.maglev: the same on every node, or nodes pick different endpoints for one
    flow (docs/design.md, "Weights and consistent hashing")."""

    table_size: Annotated[StrictInt | None, AfterValidator(_table_size)] = None
    seed: Annotated[str | None, BeforeValidator(_seed)] = None  # "0x5eed1234"

    @property
    def seed_value(self) -> int:
        """The seed as jhash takes it; 0 when unset."""
        return int(self.seed, 16) if self.seed else 0


class NodeConfigSpec(OwnModel):
    node_ips: list[IP] = Field(default_factory=list, alias="nodeIPs")
    cluster_cidrs: list[CIDR] = Field(default_factory=list, alias="clusterCIDRs")
    service_cidrs: list[CIDR] = Field(default_factory=list, alias="serviceCIDRs")
    node_port_addresses: list[str] = Field(default_factory=lambda: ["primary"])
    masquerade_all: StrictBool = False
    masquerade_bit: Annotated[StrictInt, Field(ge=0, le=31)] = 14
    zone: str = ""
    table_name: str = "svcrules"
    load_balancing: Algorithm = "random"
    maglev: MaglevConfig = Field(default_factory=lambda: MaglevConfig())

    @field_validator(
        "node_ips", "cluster_cidrs", "service_cidrs", "node_port_addresses", mode="before"
    )
    @classmethod
    def _none_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("node_ips", mode="after")
    @classmethod
    def _one_per_family(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one node IP is needed (the node's primary address)")
        families = [family_of(v) for v in value]
        if len(set(families)) != len(families):
            raise ValueError("at most one node IP per family")
        return value

    @field_validator("node_port_addresses", mode="after")
    @classmethod
    def _check_nodeport_addresses(cls, value: list[str]) -> list[str]:
        if not value:
            return ["primary"]
        out = []
        for item in value:
            item = item.strip()
            out.append("primary" if item == "primary" else canonical_cidr(item))
        if "primary" in out and len(out) > 1:
            raise ValueError("'primary' cannot be combined with CIDRs")
        return out

    @field_validator("table_name", mode="after")
    @classmethod
    def _check_table_name(cls, value: str) -> str:
        if not _TABLE_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid table name "
                "(a letter, then letters, digits, '_' or '-', at most 64)"
            )
        if why := reserved_message(value):
            raise ValueError(why)
        return value


class NodeConfigMeta(OwnModel):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_NAME)]
    # Accepted for tools that label or annotate every object; not used.
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class NodeConfig(OwnModel):
    api_version: Literal["svcrules.io/v1alpha1"] = "svcrules.io/v1alpha1"
    kind: Literal["NodeConfig"] = "NodeConfig"
    metadata: NodeConfigMeta
    spec: NodeConfigSpec

    def node_ip(self, family: int) -> str | None:
        for ip in self.spec.node_ips:
            if family_of(ip) == family:
                return ip
        return None
