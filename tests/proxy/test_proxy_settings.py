"""The proxy's settings are declared once (proxy/settings.py): the CRD's ProxySpec fields, the CLI's
flags and defaults, ProxyConfig's defaults and a pod's command line all come from that table."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from vlmpool.api.objects import Pool
from vlmpool.api.pool import ProxySpec
from vlmpool.manifests.pool import proxy_args
from vlmpool.names import API_VERSION
from vlmpool.proxy import cli
from vlmpool.proxy.server import ProxyConfig
from vlmpool.proxy.settings import BY_CRD, SETTINGS

# ProxySpec fields that are the container's, not the proxy program's (no flag carries them as such)
CONTAINER_FIELDS = {"image", "image_pull_policy", "resources",
                    "api_key_secret"}  # a Secret's name: the pod mounts it, the flag names the mount path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.configure(p)
    return p


@pytest.fixture
def clean_env(monkeypatch):
    for s in SETTINGS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)


def test_every_crd_proxy_field_is_one_declared_setting():
    hints = typing.get_type_hints(ProxySpec)
    fields = set(ProxySpec.model_fields) - CONTAINER_FIELDS
    assert fields == set(BY_CRD)
    for name in fields:
        mine = [s for s in SETTINGS if s.crd == name]
        assert len(mine) == 1, name
        s = mine[0]
        f = ProxySpec.model_fields[name]
        assert f.default == s.pool_default and type(f.default) is type(s.pool_default), name
        assert f.description == s.crd_help, name
        assert hints[name] is (s.crd_type or s.type), name


def test_the_cli_defaults_are_the_declared_defaults(clean_env):
    args = _parser().parse_args([])
    for s in SETTINGS:
        assert cli._value(args, s) == s.default, s.name
        assert type(cli._value(args, s)) is type(s.default), s.name


def test_an_environment_fallback_is_read_when_the_flag_is_absent(clean_env, monkeypatch):
    monkeypatch.setenv("VLMPOOL_PROXY_CONCURRENCY", "7")
    monkeypatch.setenv("VLMPOOL_BIND_HOST", "10.0.0.1")
    args = _parser().parse_args(["--base-model", "b"])
    values = {s.name: cli._value(args, s) for s in SETTINGS}
    assert (values["concurrency"], values["host"], values["base_model"]) == (7, "10.0.0.1", "b")
    args = _parser().parse_args(["--concurrency", "3"])
    assert cli._value(args, SETTINGS[[s.name for s in SETTINGS].index("concurrency")]) == 3


def test_proxy_config_defaults_are_the_declared_ones():
    defaults = {f.name: f.default for f in dataclasses.fields(ProxyConfig)}
    for s in SETTINGS:
        assert defaults[s.name] == s.config_default, s.name
    # where an in-process proxy starts otherwise, the table says so
    assert {s.name for s in SETTINGS if s.config_default != s.default} == {"drain_seconds", "adapter_root"}


def test_a_pods_command_line_parses_back_into_the_pools_values():
    pool = Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                       "metadata": {"name": "p", "namespace": "ns"},
                       "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"},
                                "proxy": {"queueLimit": 7, "queueTimeoutSeconds": 2.5, "requestTimeoutSeconds": 90,
                                          "drainSeconds": 0, "port": 9000, "adminPort": 9001,
                                          "cropDescribe": False, "apiKeySecret": "keys"}}})
    argv = proxy_args(pool.spec)
    assert argv[0] == "proxy"
    args = _parser().parse_args(argv[1:])
    px = pool.spec.proxy
    for crd, s in BY_CRD.items():
        if crd == "concurrency":  # pushed at run time, never on the command line
            assert s.flag not in argv
            continue
        assert getattr(args, s.name) == getattr(px, crd), crd
    assert args.api_key_dir and args.base_model == pool.spec.served_name()


def test_a_bare_proxy_and_a_pool_differ_only_where_the_table_says():
    assert {s.name for s in SETTINGS if s.crd and s.pool_default != s.default} == {"queue_limit"}
    assert ProxySpec().queue_limit == 128 and _parser().parse_args([]).queue_limit == 1024
