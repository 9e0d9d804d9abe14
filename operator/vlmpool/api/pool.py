"""VLMPool: a base vision-language model served by vLLM on `replicas` pods, each pod pairing a CPU
proxy with a vLLM engine, plus the shared volume the pool's adapters are published into."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from vlmpool import families
from vlmpool.adminwire import MAX_LOAD_PARALLELISM
from vlmpool.api.common import (
    DNS_SUBDOMAIN_PATTERN,
    MODEL_ID_PATTERN,
    Condition,
    EnvVar,
    Model,
    Quantity,
    ResourceRequirements,
    Toleration,
)
from vlmpool.proxy.settings import crd_field
from vlmpool.vllm_contract import ENGINE_IMAGE, REASONING_PARSERS

# The families a pool may name: the one family table's vision-language rows (vlmpool/families.py).
ModelFamily = Literal[families.VLM_FAMILIES]  # type: ignore[valid-type]
# Upper bound of a pixel budget: 16384 x 16384 (vLLM's processors would accept more; no VLM here is
# trained on larger images, and one such image already costs ~340k tokens at 28 px patches).
MAX_PIXELS_LIMIT = 16384 * 16384
# off, or a reasoning parser the pinned vLLM registers (vllm_contract.py; tests/vllm compares with vLLM's registry).
Reasoning = Literal[("off", *REASONING_PARSERS)]  # type: ignore[valid-type]

DEFAULT_ENGINE_IMAGE = ENGINE_IMAGE  # vllm/vllm-openai:v<VLLM_RELEASE>, the release the simulator follows
DEFAULT_PROXY_IMAGE = "ghcr.io/vlmpool/vlmpool:0.1.0"
DEFAULT_ADAPTER_VOLUME_SIZE = "10Gi"


class ModelWeights(Model):
    """Where the base model's weights are when they are not fetched by vLLM itself."""

    claim_name: str = Field(
        description="An existing PersistentVolumeClaim holding the base model (mounted read-only into the "
        "engine, and into svd patch Jobs, which need the base weights).",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    path: str = Field(
        default="/",
        description="Directory inside the claim that holds config.json and the *.safetensors files.",
        pattern=r"^/([^/\x00]+/?)*$", max_length=1024,
    )


class ImagesSpec(Model):
    """How the engine treats images: the pixel budget every image is resized into (vLLM
    --mm-processor-kwargs, in the key names of the family's processor) and how many images one prompt may
    carry (--limit-mm-per-prompt). Unset fields take the family's defaults (docs/patcher.md, families)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.minPixels) || !has(self.maxPixels) || self.minPixels <= self.maxPixels",
         "message": "images.minPixels must not exceed images.maxPixels", "fieldPath": ".minPixels",
         "reason": "FieldValueInvalid"},
    ]})

    min_pixels: int | None = Field(
        default=None, ge=1, le=MAX_PIXELS_LIMIT,
        description="Smallest image area (pixels) after resizing; smaller images are scaled up. Only for families "
        "whose processor takes a pixel budget (the Qwen families). Unset: the family's default.")
    max_pixels: int | None = Field(
        default=None, ge=1, le=MAX_PIXELS_LIMIT,
        description="Largest image area (pixels) after resizing; larger images are scaled down, which bounds the "
        "tokens one image costs. Only for families whose processor takes a pixel budget. Unset: the family's "
        "default.")
    max_images_per_prompt: int | None = Field(
        default=None, ge=0, le=256,
        description="Images one request may carry (vLLM --limit-mm-per-prompt); 0 makes the pool text-only. "
        "Unset: vLLM's default.")


class BaseModelSpec(Model):
    """The base model of the pool."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.images) || (!has(self.images.minPixels) && !has(self.images.maxPixels)) || "
                 "self.family in " + repr(list(families.PIXEL_BUDGET_FAMILIES)),
         "message": "images.minPixels/maxPixels apply only to families whose processor takes a pixel budget: "
                    + ", ".join(families.PIXEL_BUDGET_FAMILIES),
         "fieldPath": ".images", "reason": "FieldValueInvalid"},
    ]})

    name: str = Field(
        description="The base model's id as vLLM loads it (e.g. Qwen/Qwen2.5-VL-3B-Instruct). Adapter "
        "patch Jobs compare each adapter's base_model_name_or_path against it.",
        pattern=MODEL_ID_PATTERN,
    )
    served_name: str | None = Field(
        default=None,
        description="The name clients send as `model` for the base model (vLLM --served-model-name). "
        "Defaults to name.",
        pattern=MODEL_ID_PATTERN,
    )
    family: ModelFamily = Field(
        description="Model family: picks the tensor layout adapters are remapped to, the vision-tower "
        "tensors dropped, and the defaults of images and reasoning (docs/patcher.md lists the families).",
    )
    images: ImagesSpec | None = Field(
        default=None, description="Image pixel budget and images per prompt. Unset: the family's defaults.")
    reasoning: Reasoning | None = Field(
        default=None,
        description="The vLLM reasoning parser that splits the model's thinking from its answer "
        "(--reasoning-parser, e.g. qwen3), or off. Unset: the family's default (qwen3 for qwen3_5, off for "
        "the others). Another engine release's parsers: engine.extraArgs.")
    weights: ModelWeights | None = Field(
        default=None,
        description="Where the base weights live. Unset: vLLM fetches `name` itself. Required for the "
        "svd DoRA policy, whose Job needs the base weights.",
    )

    @model_validator(mode="after")
    def _check_images(self) -> BaseModelSpec:
        self.pixel_budget()
        return self

    def pixel_budget(self) -> tuple[int, int] | None:
        """(min_pixels, max_pixels) the engine resizes images into: the spec's, else the family's; None for a
        family whose processor takes no pixel budget. Raises ValueError on a budget that cannot hold."""
        fam = families.family(self.family)
        img = self.images or ImagesSpec()
        if fam.pixel_budget is None:
            if img.min_pixels is not None or img.max_pixels is not None:
                raise ValueError(f"images.minPixels/maxPixels do not apply to family {self.family} (its processor "
                                 "takes no pixel budget); they apply to " + ", ".join(families.PIXEL_BUDGET_FAMILIES))
            return None
        lo = img.min_pixels if img.min_pixels is not None else fam.pixel_budget.min_pixels
        hi = img.max_pixels if img.max_pixels is not None else fam.pixel_budget.max_pixels
        if lo > hi:
            raise ValueError(f"images: minPixels {lo} exceeds maxPixels {hi} (an unset one is the {self.family} "
                             f"default: min {fam.pixel_budget.min_pixels}, max {fam.pixel_budget.max_pixels})")
        return lo, hi

    def reasoning_parser(self) -> str | None:
        """The vLLM reasoning parser to run, None for off: the spec's, else the family's default."""
        if self.reasoning is None:
            return families.family(self.family).reasoning_parser
        return None if self.reasoning == "off" else self.reasoning


class EngineSecurityContext(Model):
    """What a pool may change in its engine container's security context: the user and whether the root
    filesystem is writable. Privilege, capabilities and seccomp are not offered (docs/security.md)."""

    run_as_user: int | None = Field(default=None, ge=0, le=2147483647, description="uid of the engine process.")
    run_as_group: int | None = Field(default=None, ge=0, le=2147483647, description="gid of the engine process.")
    run_as_non_root: bool | None = Field(default=None, description="false for an image that must run as root.")
    read_only_root_filesystem: bool | None = Field(
        default=None, description="false for an image that writes outside HOME and /tmp.")


class EngineSpec(Model):
    """The vLLM container of every pod."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
         "message": "engine.maxCpuLoras must be at least engine.maxLoras", "fieldPath": ".maxCpuLoras",
         "reason": "FieldValueInvalid"},
    ]})

    image: str = Field(default=DEFAULT_ENGINE_IMAGE, description="vLLM OpenAI server image.", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the engine container."
    )
    gpus: int = Field(default=1, ge=0, le=16,
                      description="nvidia.com/gpu per pod; also vLLM's --tensor-parallel-size when above 1.")
    resources: ResourceRequirements | None = Field(
        default=None, description="CPU/memory of the engine container (GPUs come from `gpus`)."
    )
    max_loras: int = Field(default=4, ge=1, le=256,
                           description="Adapters active in one batch (vLLM --max-loras).")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, le=4096,
        description="Adapters kept in host memory, LRU (vLLM --max-cpu-loras); at least maxLoras. "
        "Unset: vLLM's default (maxLoras).",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=64, description="Largest adapter rank the engine accepts (vLLM --max-lora-rank); patch "
        "Jobs refuse adapters above it."
    )
    max_model_len: int | None = Field(default=None, ge=256, le=10_000_000,
                                      description="Context length (vLLM --max-model-len).")
    tower_connector_lora: bool = Field(
        default=False, description="Serve LoRA on the vision tower and connector too (vLLM "
        "--enable-tower-connector-lora). Off: patch Jobs drop untrained vision-tower tensors and refuse trained "
        "ones; on: they keep the vision tensors of the modules the family's vLLM model serves.")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Fraction of GPU memory vLLM may use (--gpu-memory-utilization)."
    )
    port: int = Field(default=8000, ge=1024, le=65535, description="Port vLLM listens on inside the pod.")
    load_parallelism: int = Field(
        default=4, ge=1, le=MAX_LOAD_PARALLELISM,
        description="Adapter loads each pod's proxy runs at once while it converges to a "
        "pushed state (pushed at run time, no pod restart). vLLM loads one adapter at a time per engine, so more "
        "mostly overlaps the file reads.")
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM command-line arguments (not "
                                  "--host, --port or --uds: the engine listens on the pod's loopback only).")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of the engine container.")
    startup_timeout_seconds: int = Field(
        default=1800, ge=60, le=86400,
        description="How long the engine may take to load the model before its startup probe fails.",
    )
    security_context: EngineSecurityContext | None = Field(
        default=None, description="Loosens the engine container's default security context (uid/gid 65532, "
        "non-root, read-only root, no capabilities, no privilege escalation) for images that demand it; a "
        "namespace enforcing the restricted Pod Security profile refuses what it loosens.",
    )

    @field_validator("extra_args")
    @classmethod
    def _engine_stays_on_loopback(cls, args: list[str]) -> list[str]:
        for a in args:
            flag = a.split("=", 1)[0]
            if flag in ("--host", "--port", "--uds"):
                raise ValueError(f"engine.extraArgs may not set {flag}: the engine listens on the pod's loopback "
                                 "only (its API has no authentication); set engine.port for the port")
        return args


class ProxySpec(Model):
    """The CPU proxy container of every pod: the pool's OpenAI-compatible front."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.port != self.adminPort", "message": "proxy.adminPort must differ from proxy.port",
         "fieldPath": ".adminPort", "reason": "FieldValueInvalid"},
        {"rule": "self.queueTimeoutSeconds <= self.requestTimeoutSeconds",
         "message": "proxy.queueTimeoutSeconds must not exceed proxy.requestTimeoutSeconds",
         "fieldPath": ".queueTimeoutSeconds", "reason": "FieldValueInvalid"},
    ]})

    image: str = Field(default=DEFAULT_PROXY_IMAGE, description="vlmpool image (runs `vlmpool proxy`).",
                       min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the proxy container."
    )
    # the proxy's settings a pool exposes: declared once, in proxy/settings.py (default, bounds, description)
    concurrency: int = crd_field("concurrency")
    queue_limit: int = crd_field("queue_limit")
    queue_timeout_seconds: float = crd_field("queue_timeout_seconds")
    request_timeout_seconds: float = crd_field("request_timeout_seconds")
    drain_seconds: int = crd_field("drain_seconds")
    port: int = crd_field("port")
    admin_port: int = crd_field("admin_port")
    resources: ResourceRequirements | None = Field(default=None, description="CPU/memory of the proxy container.")
    api_key_secret: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
        description="A Secret in the pool's namespace whose keys' values are the accepted bearer tokens of the "
        "public API (Authorization: Bearer <value>); changes apply without a restart. /healthz, /readyz and "
        "/metrics stay open. Unset: no authentication (only the network decides who may call).",
    )
    crop_describe: bool = crd_field("crop_describe")


class AdapterVolumeSpec(Model):
    """The shared volume adapters are published into: read-write in patch Jobs, read-only in pods."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!(has(self.claimName) && has(self.size))",
         "message": "adapterVolume.claimName (an existing claim) excludes adapterVolume.size",
         "fieldPath": ".size", "reason": "FieldValueForbidden"},
        {"rule": "!(has(self.claimName) && has(self.storageClassName))",
         "message": "adapterVolume.claimName (an existing claim) excludes adapterVolume.storageClassName",
         "fieldPath": ".storageClassName", "reason": "FieldValueForbidden"},
    ]})

    claim_name: str | None = Field(
        default=None, description="Use this existing claim instead of creating `<pool>-adapters`.",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    storage_class_name: str | None = Field(
        default=None, description="Storage class of the created claim (needs ReadWriteMany for more than one "
        "node). Unset: the cluster default.", max_length=253,
    )
    size: Quantity | None = Field(default=None, description="Size of the created claim; default 10Gi.")
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        default="ReadWriteMany", description="Access mode of the created claim."
    )


class ServiceSpec(Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP",
                                                                     description="Service type.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the Service.")


class SchedulingSpec(Model):
    """Where the pool's pods may run."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints pods tolerate.")
    affinity: dict[str, Any] | None = Field(
        default=None, description="A core/v1 Affinity, passed to the pods as given.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods.", max_length=253)


class RoutingSpec(Model):
    """LoRA-affinity routing through the Gateway API Inference Extension (docs/routing.md): an
    InferencePool over the pool's pods (targeting the proxy port, whose /metrics carry the vLLM series
    the endpoint picker reads, under served names) and, unless `endpointPicker` is false, the endpoint
    picker (EPP) itself with LoRA affinity configured."""

    endpoint_picker: bool = Field(
        default=True, description="Render the EPP (Deployment, Service, ServiceAccount, Role, ConfigMap) as "
        "`<pool>-epp`; false: only the InferencePool, whose endpointPickerRef names `<pool>-epp` you provide.")
    image: str | None = Field(default=None, min_length=1,
                              description="EPP image; default the pinned GIE release's.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose", description="What the gateway does when the EPP does not answer: FailOpen "
        "falls back to plain load balancing, FailClose refuses the request.")
    lora_affinity_weight: int = Field(
        default=4, ge=0, le=100, description="Weight of the lora-affinity-scorer in the EPP's profile (the "
        "queue and KV-cache scorers weigh 1; 0 turns affinity off).")


_INT_OR_PERCENT = re.compile(r"^(0|[1-9][0-9]{0,5})%?$")


class RolloutSpec(Model):
    """How the pool's Deployment replaces pods when its pod template changes (RollingUpdate)."""

    max_unavailable: int | str = Field(
        default=1, description="Pods that may be down during a roll: a count or a percent of replicas (\"25%\"). "
        "Default 1: a pool whose pods hold every GPU can still roll (no surge pod needs a free GPU).")
    max_surge: int | str = Field(
        default=0, description="Extra pods above replicas during a roll: a count or a percent. Default 0 (a surge "
        "pod needs free GPUs; on a full cluster it stays Pending and the roll never ends). Set 1 with spare "
        "capacity to roll without losing a pod's worth of serving.")

    @field_validator("max_unavailable", "max_surge", mode="before")
    @classmethod
    def _int_or_percent(cls, v: Any) -> int | str:
        ok_str = isinstance(v, str) and bool(_INT_OR_PERCENT.fullmatch(v)) and \
            (not v.endswith("%") or int(v[:-1]) <= 100)
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and not 0 <= v <= 100_000) or \
                (isinstance(v, str) and not ok_str):
            raise ValueError(f"must be a count >= 0 or a percent such as '25%', not {v!r}")
        return int(v) if isinstance(v, str) and not v.endswith("%") else v

    @model_validator(mode="after")
    def _not_both_zero(self) -> RolloutSpec:
        if str(self.max_unavailable).rstrip("%") == "0" and str(self.max_surge).rstrip("%") == "0":
            raise ValueError("maxUnavailable and maxSurge cannot both be 0: the roll could never start")
        return self


class VLMPoolSpec(Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.engine.port != self.proxy.port && self.engine.port != self.proxy.adminPort",
         "message": "engine.port must differ from proxy.port and proxy.adminPort (they share the pod)",
         "fieldPath": ".engine.port", "reason": "FieldValueInvalid"},
    ]})

    model: BaseModelSpec = Field(description="The base vision-language model.")
    replicas: int = Field(default=1, ge=0, le=1000, description="Pods in the pool.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    proxy: ProxySpec = Field(default_factory=ProxySpec, description="Proxy settings.")
    adapter_volume: AdapterVolumeSpec = Field(default_factory=AdapterVolumeSpec,
                                              description="The shared adapter volume.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The pool's Service.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Pod scheduling.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec,
                                 description="How pods are replaced on a pod-template change (see RolloutSpec).")
    routing: RoutingSpec | None = Field(
        default=None, description="LoRA-affinity routing (Gateway API Inference Extension); unset: the plain "
        "Service only.")

    def served_name(self) -> str:
        return self.model.served_name or self.model.name


class AdapterCounts(Model):
    total: int = Field(default=0, ge=0, description="VLMAdapters that reference this pool.")
    ready: int = Field(default=0, ge=0, description="Adapters Ready on the pool.")
    failed: int = Field(default=0, ge=0, description="Adapters Failed.")


class VLMPoolStatus(Model):
    observed_generation: int | None = Field(default=None, ge=0, description="Last metadata.generation acted on.")
    replicas: int = Field(default=0, ge=0, description="Pods of the pool's Deployment.")
    ready_replicas: int = Field(default=0, ge=0, description="Pods ready to serve.")
    ready: str | None = Field(default=None, description="readyReplicas/replicas, for `kubectl get`.")
    selector: str | None = Field(
        default=None, description="Label selector of the pool's pods (the scale subresource's, for HPA/KEDA).")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible Service.")
    concurrency: int | None = Field(default=None, ge=1, description="Per-pod concurrency in effect.")
    adapters: AdapterCounts | None = Field(default=None, description="Adapter counts.")
    adapters_ready: str | None = Field(default=None, description="ready/total adapters, for `kubectl get`.")
    desired_state_generation: int | None = Field(
        default=None, ge=0, description="Generation of the last state pushed to the pool's proxies.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Ready, Progressing and Degraded conditions.")
