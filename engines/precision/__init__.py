"""Precision policies and the code that makes each backend obey them.

:mod:`~engines.precision.policy` holds the one op-class table, the one dtype table,
the built-in policies and policy files; :mod:`~engines.precision.torch_apply` rewrites a
PyTorch model from a policy, :mod:`~engines.precision.onnx_convert` writes it into an
ONNX graph as explicit Casts, and :mod:`~engines.precision.audit` proves, per engine,
that what runs is what the policy says.
"""
