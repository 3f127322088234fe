"""TensorRT: the parts that need no GPU always; building and running where tensorrt imports."""

import pytest
import torch

from engines.backends.base import BuildOptions
from engines.backends.base import BackendUnavailableError

from engines.batch import InvalidInputError
from engines.precision.policy import get_policy
from engines.backends.trt import INSTALL_HINT, ShapeProfile, check_engine_types, import_tensorrt, inspector_datatypes


def layer(fmt_in: str, fmt_out: str) -> dict:
    return {"Name": "l", "Inputs": [{"Format/Datatype": fmt_in}], "Outputs": [{"Format/Datatype": fmt_out}]}


def test_an_fp16_engine_that_built_in_fp32_is_caught():
    silently_fp32 = {"Layers": [layer("Row major linear FP32 format", "Row major linear FP32 format")]}
    problems = check_engine_types(silently_fp32, get_policy("hybrid"))
    assert problems and "shows no float16 tensor formats" in problems[0]
    honest = {"Layers": [layer("Row major linear FP32 format", "Row major linear FP16 format")]}
    assert check_engine_types(honest, get_policy("hybrid")) == []
    assert inspector_datatypes(honest) == {"FP32", "FP16"}
    assert check_engine_types(honest, get_policy("fp32"))  # FP16 in an FP32 engine is wrong too


def test_shape_profile_clips_to_the_model_and_checks_inputs():
    profile = ShapeProfile().clipped(max_positions=256)
    assert profile.max == (32, 256) and profile.opt == (8, 128)
    profile.check((32, 256), "e")
    with pytest.raises(InvalidInputError, match="outside the engine's optimization profile"):
        profile.check((33, 8), "e")


def test_missing_tensorrt_skips_with_the_install_hint():
    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        assert INSTALL_HINT in str(exc)
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "hybrid", "fp16-strict"])
def test_tensorrt_engine_builds_caches_and_is_faithful(tiny_bert, tmp_path, precision):
    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    from engines.cache import EngineCache
    from engines.graphs.export import check_batch
    from engines.backends.torch_eager import TorchReferenceRunner
    from engines.backends.trt import TensorRTRunner

    cache = EngineCache(tmp_path)
    runner = TensorRTRunner(tiny_bert, get_policy(precision), "cuda", BuildOptions(cache=cache)).build()
    assert runner.audit and runner.memory["device_memory_bytes"] > 0
    batch = check_batch(tiny_bert)
    got = runner.infer(batch)
    want = TorchReferenceRunner(tiny_bert, "cuda").build().infer(batch)
    valid = batch.attention_mask.bool().cuda()
    cosine = torch.nn.functional.cosine_similarity(got[valid].double().flatten(), want[valid].double().flatten(), dim=0)
    assert cosine > 0.9998
    TensorRTRunner(tiny_bert, get_policy(precision), "cuda", BuildOptions(cache=EngineCache(tmp_path))).build()
    assert (tmp_path / "timing").is_dir()
