"""Adapter sources as plug-ins: one module per scheme (https, hf, s3, pvc, file) declaring its grammar,
the CEL rule the CRD carries, the patch Job's volume and credential keys, its egress policy and its
fetcher (scheme.SourceScheme); registry.py registers them, and the CRD, the manifests and the patcher
derive from it. fetchlib.py holds what the fetchers share."""
