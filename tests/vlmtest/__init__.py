"""Helpers and builders the test folders share: importable as `vlmtest` from any test (pyproject's
[tool.pytest.ini_options] pythonpath puts tests/ on sys.path), under a name no test folder, conftest
module or installed package uses, so an import never resolves to another folder's module.

- vlmtest.operator: the operator tests' kubelet stand-in (pod processes, Job pods), `vlmpool operator`
  as a process, the Prometheus counter helpers;
- vlmtest.proxy: the real simulator and proxy as in-process servers or processes, and the `sim` fixture;
- vlmtest.misbehaving: an engine that misbehaves on purpose (the proxy's DoS tests).

Waiting on a condition: vlmpool.testing.waiting (wait_for, and wait_until, its async form), nothing here.
"""
