"""Refusals of the patcher: each has a stable CamelCase reason the operator copies into status."""

from __future__ import annotations

# Every reason the patcher can give, with a one-line meaning (docs/patcher.md lists the same).
REASONS: dict[str, str] = {
    "InvalidArguments": "a command-line option or API argument is invalid",
    "InvalidSource": "the source URI is malformed or uses an unsupported scheme",
    "SourceNotFound": "the source (file, directory, URL, repository, object) does not exist",
    "SourceUnavailable": "the source could not be reached or answered with an error (retryable)",
    "SourceAddressRefused": "the source (or a host it redirects to) is loopback, link-local, private or "
                            "cluster-internal and not allow-listed by the cluster admin",
    "SourceRedirectRefused": "the source redirected off https, or a request would carry credentials to another host",
    "FetchTimeout": "fetching a remote source took longer than --fetch-timeout (a slow or stalled source)",
    "ChecksumMismatch": "the fetched bytes do not match the sha256 pin",
    "FileTooLarge": "a file (or archive member) is larger than --max-file-bytes",
    "UnsafeArchive": "an archive member has an absolute path, a '..' segment, is a link, sparse or not a regular "
                     "file, or the archive's metadata (members, tar extended headers, zip central directory) is "
                     "over its bound",
    "UnsupportedArchive": "a zip member the adapter needs is encrypted or uses a compression method other than "
                          "stored, deflate, bzip2 or lzma",
    "ArchiveTooLarge": "the archive's members (skipped ones included) inflate to more than twice --max-file-bytes",
    "UnsafeSource": "a file of a directory source is a symbolic link or not a regular file",
    "AmbiguousSource": "the source holds more than one adapter directory",
    "PickleWeights": "the adapter weights are pickle files (.bin/.pt/.pth/.pkl/.ckpt); only safetensors are read",
    "MissingConfig": "adapter_config.json is missing",
    "MissingWeights": "adapter_model.safetensors is missing",
    "InvalidConfig": "adapter_config.json is not a valid PEFT LoRA config",
    "InvalidWeights": "adapter_model.safetensors cannot be parsed as safetensors",
    "NotLora": "the adapter is not a LoRA adapter (peft_type is not LORA)",
    "ModulesToSave": "modules_to_save is not empty: full-module replacements cannot be served as dynamic LoRA",
    "RankMissing": "adapter_config.json has no rank r",
    "RankTooHigh": "the rank is over the pool's max LoRA rank",
    "UnsupportedLoraFeature": "the config uses a LoRA feature the pinned vLLM refuses at load (lora_bias, PiSSA/OLoRA/"
                              "LoftQ/CorDA init, aLoRA, layer_replication, BD-LoRA, QALoRA, adapter bias)",
    "BaseModelMismatch": "adapter_config.json declares another base model than the pool's (strict check)",
    "BaseModelUnknown": "adapter_config.json declares no base model, so a strict check cannot pass",
    "TrainedVisionTower": "the adapter trained the vision tower, which vLLM cannot serve",
    "UnsupportedTargetModules": "the adapter has LoRA tensors on modules vLLM cannot serve for this family",
    "UnrecognisedTensor": "a tensor key is not a LoRA A/B matrix or DoRA magnitude vector",
    "IncompleteModule": "a module has lora_A without lora_B (or the reverse)",
    "ShapeMismatch": "a LoRA tensor's shape does not fit the module it adapts",
    "NoServableTensors": "no LoRA tensor is left after dropping what vLLM cannot load",
    "DoraRejected": "the adapter uses DoRA and the DoRA policy is reject",
    "DoraErrorTooHigh": "the measured error of the strip/svd DoRA policy is above the adapter's spec.dora.maxError",
    "DoraErrorNotMeasured": "spec.dora.maxError is set but the strip policy's error could not be measured (no base "
                            "weights, or no torch in the patcher image)",
    "DoraNeedsBaseWeights": "the svd DoRA policy needs the base weights (--base-weights)",
    "NeedsTorch": "the adapter needs tensor maths (DoRA svd) and this patcher has no torch "
                  "(use the patcher-dora image)",
    "BaseWeightsNotFound": "a module's weight is not in the base weights",
    "InvalidAdapterName": "the adapter name is not a valid Kubernetes object name",
    "LockTimeout": "another patch of the same adapter held the publish lock too long",
    "InternalError": "an unexpected error (a bug): the message has the details",
}


class PatchError(Exception):
    """A refusal with a stable reason. ``str(err)`` is the human message."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:  # pragma: no cover - a programming error
            raise ValueError(f"unknown patch refusal reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"PatchError({self.reason!r}, {self.message!r})"
