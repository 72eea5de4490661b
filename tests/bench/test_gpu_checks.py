import pytest

from specc.bench.gpu_checks import parse_configs


def test_gpu_check_configs_parse_dtype_then_tree_and_name_a_bad_one():
    assert parse_configs("fp32:eagle; bf16:dynamic:8,6,48;") == (("fp32", "eagle"), ("bf16", "dynamic:8,6,48"))
    with pytest.raises(ValueError, match="'fp16:eagle'.*DTYPE:TREE"):
        parse_configs("fp16:eagle")
    with pytest.raises(ValueError, match="no check configs"):
        parse_configs(" ; ")
