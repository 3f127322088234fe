"""The engine options: one table, one list parser, validation at start-up."""

import pytest

from engines.options import (
    DEFAULT_MODELS,
    ENGINE_OPTIONS,
    EngineSelection,
    Option,
    OptionError,
    add_options,
    collect,
    parse_list,
    value_or_default,
)


def test_the_list_parser_takes_defaults_and_refuses_empty_or_repeated_lists():
    assert parse_list(None, flag="--models", default=("a", "b")) == ["a", "b"]
    assert parse_list(" a, b ,", flag="--models", default=()) == ["a", "b"]
    with pytest.raises(OptionError, match="--models is empty: give NAME"):
        parse_list(" , ", flag="--models", default=("a",))
    with pytest.raises(OptionError, match="names a more than once"):
        parse_list("a,b,a", flag="--models", default=())


def test_one_table_feeds_the_command_line_and_its_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser.add_argument, ENGINE_OPTIONS)
    values = collect(vars(parser.parse_args([])).get, ENGINE_OPTIONS)
    assert values["device"] is None  # not given: the table's default applies, and help states it
    assert value_or_default(values, ENGINE_OPTIONS, "device") == "auto"
    selection = EngineSelection.from_values(values)
    assert selection.models == list(DEFAULT_MODELS) and selection.numerics.name == "production"
    assert selection.trt_target == "auto" and selection.device == "cpu"
    help_text = parser.format_help()
    assert "(default: production)" in " ".join(help_text.split())


@pytest.mark.parametrize(
    "values,message",
    [
        ({"models": "tiny-bert,llama"}, "unknown model 'llama'"),
        ({"precisions": "fp8"}, "unknown precision 'fp8'"),
        ({"backends": "tvm"}, "unknown backend 'tvm'"),
        ({"trt_target": "ampere"}, "--trt-target must be auto or a compute capability"),
        ({"precisions": "hybrid,file:/nonexistent/p.json"}, "does not exist"),
    ],
)
def test_bad_values_name_the_fix(values, message):
    from engines.options import usage_errors

    with pytest.raises(usage_errors(), match=message):
        EngineSelection.from_values(values)


def test_two_policies_of_one_name_are_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text('{"schema": 1, "name": "same", "base": "fp16"}')
    with pytest.raises(OptionError, match="two policies are named 'same'"):
        EngineSelection.from_values({"precisions": f"file:{tmp_path / 'a.json'},file:{tmp_path / 'b.json'}"})


def test_an_engine_cache_from_the_environment_that_is_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("FIDELITY_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OptionError, match=r"\$FIDELITY_ENGINE_CACHE .* is a file, not a folder"):
        EngineSelection.from_values({})


def test_flags_and_repeatable_options_state_no_default():
    assert Option("--x", "h", kind="flag").help_text() == "h"
    assert Option("--y", "h", default=3).help_text() == "h (default: 3)"
