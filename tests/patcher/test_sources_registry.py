"""Adapter sources are plug-ins (vlmpool.patcher.sources): a new scheme is one module and one
registration, and the CRD, the patch Job and the patcher's dispatch all pick it up from the registry."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from vlmpool.api.adapter import AdapterSource
from vlmpool.api.crdgen import render
from vlmpool.manifests import adapter as MA
from vlmpool.patcher.sources import registry
from vlmpool.patcher.sources.scheme import SOURCES_ROOT

# The whole of a new scheme: one module.
DEMO_MODULE = textwrap.dedent('''
    """demo://<name>: a scheme of the test, from a volume of its own."""
    from vlmpool.patcher import egress
    from vlmpool.patcher.errors import PatchError
    from vlmpool.patcher.sources.scheme import FetchRequest, JobSource, SourceScheme

    def fetch(req: FetchRequest):
        guarded = egress.current() is not None
        raise PatchError("SourceNotFound", f"demo fetcher reached for {req.uri} (guarded: {guarded})")

    def job_source(uri: str) -> JobSource:
        return JobSource(volume={"name": "source", "configMap": {"name": uri[len("demo://"):]}},
                         mount={"name": "source", "mountPath": "/mnt/demo", "readOnly": True},
                         options=(("pvc_root", "/mnt/demo"),))

    SCHEME = SourceScheme(name="demo", prefix="demo://", listed=6, form="demo://name (a test scheme)",
                          grammar="^demo://[a-z]+$", grammar_message="a demo:// source must be demo://<name>",
                          credential_keys=("DEMO_TOKEN",), remote=True, job_source=job_source, fetch=fetch)
''')

# ... and one registration, before the CRD, the manifests and the patcher are looked at.
PROBE = textwrap.dedent('''
    import json, sys, tempfile
    sys.path.insert(0, sys.argv[1])
    import demo
    from vlmpool.patcher.sources import registry
    registry.register(demo.SCHEME)

    import yaml
    from vlmpool.api.crdgen import render
    from vlmpool.api.objects import Adapter, Pool
    from vlmpool.manifests import adapter as MA
    from vlmpool.names import API_VERSION
    from vlmpool.patcher import PatchError, fetch_adapter

    crd = yaml.safe_load(render()["vlmpool.io_vlmadapters.yaml"])
    source = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["source"]
    pool = Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                       "metadata": {"name": "vision", "namespace": "ml", "uid": "u"},
                       "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}}})
    adapter = Adapter.parse({"apiVersion": API_VERSION, "kind": "VLMAdapter",
                             "metadata": {"name": "invoices", "namespace": "ml", "uid": "a"},
                             "spec": {"poolRef": {"name": "vision"},
                                      "source": {"uri": "demo://shelf", "credentialsSecret": {"name": "creds"}}}})
    job = MA.patch_job(adapter, pool)
    pod = job["spec"]["template"]["spec"]
    try:
        fetch_adapter("demo://shelf", tempfile.mkdtemp(), allow=[])
        fetched = None
    except PatchError as e:
        fetched = [e.reason, e.message]
    print(json.dumps({"rules": source["x-kubernetes-validations"], "pattern": source["properties"]["uri"]["pattern"],
                      "description": source["properties"]["uri"]["description"], "volumes": pod["volumes"],
                      "container": pod["containers"][0], "fetched": fetched}))
''')


def test_a_new_scheme_is_one_module_and_one_registration(tmp_path):
    (tmp_path / "demo.py").write_text(DEMO_MODULE)
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    # the CRD: the scheme's CEL rule, and source.uri's pattern and description name it
    assert {"rule": "!self.uri.startsWith('demo://') || self.uri.matches('^demo://[a-z]+$')",
            "message": "a demo:// source must be demo://<name>", "fieldPath": ".uri",
            "reason": "FieldValueInvalid"} in seen["rules"]
    assert "|demo://)" in seen["pattern"] and seen["description"].endswith(" or demo://name (a test scheme).")
    # the patch Job: its volume and mount, its option, its credential key
    c = seen["container"]
    assert {"name": "source", "configMap": {"name": "shelf"}} in seen["volumes"]
    assert {"name": "source", "mountPath": "/mnt/demo", "readOnly": True} in c["volumeMounts"]
    assert c["args"][-2:] == ["--pvc-root", "/mnt/demo"]
    assert {"name": "DEMO_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "DEMO_TOKEN",
                                                                  "optional": True}}} in c["env"]
    # the patcher: dispatched to its fetcher, under the egress guard (remote=True)
    assert seen["fetched"] == ["SourceNotFound", "demo fetcher reached for demo://shelf (guarded: True)"]


def test_the_crd_and_the_job_derive_from_the_registry():
    """What the registry says is what the CRD carries and the Job passes, for the built-in schemes."""
    schema = AdapterSource.model_json_schema(by_alias=True)
    assert schema["x-kubernetes-validations"] == registry.cel_rules()
    assert schema["properties"]["uri"]["pattern"] == registry.uri_pattern()
    assert {s.name for s in registry.SCHEMES.values()} == {"https", "hf", "s3", "pvc", "file"}
    assert MA.CREDENTIAL_KEYS == registry.credential_keys()
    assert "AUTHORIZATION" in MA.CREDENTIAL_KEYS and "HF_TOKEN" in MA.CREDENTIAL_KEYS
    assert "'pvc://'" in render()["vlmpool.io_vlmadapters.yaml"]


def test_each_grammar_is_the_crds_and_the_patchers():
    """One grammar per scheme: the URIs the CRD's rule refuses (as RE2 reads it: the same regex)
    are the ones the scheme's parse refuses, whitespace (the CRD's pattern) included."""
    from vlmpool.patcher.sources import hf, pvc, s3

    cases = {
        hf: {"hf://acme/ft": ("acme/ft", "main"), "hf://acme/ft@v1/x": ("acme/ft", "v1/x"), "hf://acme": None,
             "hf://acme/ft@": None, "hf://acme/ft\n": None, "hf://-a/ft": None},
        s3: {"s3://bucket/a/b.tgz": ("bucket", "a/b.tgz"), "s3://bucket": ("bucket", ""), "s3://b": None,
             "s3://bucket/a b": None, "s3://Bucket/x": None},
        pvc: {"pvc://claim/a/b/": ("claim", ["a", "b"]), "pvc://claim/./a": ("claim", ["a"]), "pvc://claim": None,
              "pvc://claim/": None, "pvc://claim//a": None, "pvc://claim/a/../b": None, "pvc://Claim/a": None,
              "pvc://claim/adapter\n": None},
    }
    for module, uris in cases.items():
        for uri, want in uris.items():
            assert module.parse(uri) == want, uri
            assert module.SCHEME.well_formed(uri) == (want is not None or ".." in uri), uri


def test_volume_sources_mount_under_the_one_sources_root():
    job_source = registry.job_source("pvc://uploads/team/v1")
    assert job_source is not None
    assert job_source.mount["mountPath"] == f"{SOURCES_ROOT}/uploads"
    assert job_source.options == (("pvc_root", SOURCES_ROOT),)
    assert registry.job_source("pvc://uploads") is None and registry.job_source("hf://a/b") is None
