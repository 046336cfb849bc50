"""The shared typed-config builder (minitron_jax.typed_config) and the configs built with it: one error style,
sections applied on their field's default, and the pipeline's optimizer keys read flat or nested."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest

from minitron_jax.typed_config import (
    TypedConfigError,
    apply_overrides,
    build,
    load,
    nondefault,
    read_yaml_sections,
)

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Inner:
    a: int = 1
    b: float = 2.0
    c: str | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    shifted: Inner = dataclasses.field(default_factory=lambda: Inner(a=7, b=8.0))
    sizes: list[int] = dataclasses.field(default_factory=list)
    steps: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (0, "x")
    table: dict[str, Inner] = dataclasses.field(default_factory=dict)
    kind: Literal["kd", "ce"] = "kd"
    either: int | float = 0
    free: Any = None


class MyError(ValueError):
    pass


def test_types_are_checked_and_converted():
    o = build(Outer, {"name": "n", "inner": {"a": 3, "b": "3e-4"}, "sizes": [1, 2], "steps": [4, 5],
                      "pair": [1, "y"], "table": {"t": {"a": 2}}, "kind": "ce", "either": 3, "free": [1]})
    assert o.inner == Inner(a=3, b=3e-4) and o.sizes == [1, 2] and o.steps == (4, 5) and o.pair == (1, "y")
    assert o.table == {"t": Inner(a=2)} and o.kind == "ce" and o.either == 3 and isinstance(o.either, int)
    assert o.free == [1]


@pytest.mark.parametrize("data, message", [
    ({"name": "n", "inner": {"aa": 1}},
     "unknown config key inner.aa (did you mean inner.a?); valid keys here: a, b, c"),
    ({"name": "n", "inner": {"a": "ten"}}, "inner.a: expected an integer, got str 'ten'"),
    ({"name": "n", "inner": {"a": True}}, "inner.a: expected an integer, got bool True"),
    ({"name": "n", "inner": {"c": 5}}, "inner.c: expected a string, got int 5"),
    ({"name": "n", "inner": 3}, "inner: expected a mapping (section), got int 3"),
    ({"name": "n", "sizes": "x"}, "sizes: expected a list, got str 'x'"),
    ({"name": "n", "steps": [1, "a"]}, "steps[1]: expected an integer, got str 'a'"),
    ({"name": "n", "pair": [1]}, "pair: expected a list of 2 items, got 1"),
    ({"name": "n", "kind": "mse"}, "kind: must be one of 'kd', 'ce', got 'mse'"),
    ({"name": "n", "either": "x"}, "either: expected int | float, got str 'x'"),
    ({"name": None}, "name: expected a string, got NoneType None"),
    ({}, "missing required config key name"),
])
def test_one_error_style(data, message):
    with pytest.raises(MyError) as e:
        build(Outer, data, error=MyError)
    assert str(e.value).startswith(message), str(e.value)


def test_sections_apply_on_their_field_default_and_null_means_default():
    o = build(Outer, {"name": "n", "shifted": {"b": 9.0}, "inner": None, "sizes": None, "table": None})
    assert o.shifted == Inner(a=7, b=9.0) and o.inner == Inner() and o.sizes == [] and o.table == {}
    assert build(Outer, {"name": "n", "shifted": None}).shifted == Inner(a=7, b=8.0)


def test_overrides_and_files(tmp_path):
    data = apply_overrides({"name": "n"}, ["inner.a=5", "sizes=[1, 2]", "shifted.b=1e-3"])
    assert build(Outer, data) == Outer(name="n", inner=Inner(a=5), sizes=[1, 2], shifted=Inner(a=7, b=1e-3))
    for bad, message in (("inner", "is not of the form"), ("inner..a=1", "empty key part"),
                         ("name.x=1", "name is not a section"), ("a=[", "value is not valid YAML")):
        with pytest.raises(TypedConfigError, match=message):
            apply_overrides({"name": "n"}, [bad])
    f = tmp_path / "c.yaml"
    f.write_text("name: n\ninner: {a: 2}\n")
    assert load(Outer, f, ["inner.b=4"]) == Outer(name="n", inner=Inner(a=2, b=4.0))
    with pytest.raises(MyError, match=r"c\.yaml: unknown config key inner\.z"):
        load(Outer, f, ["inner.z=1"], error=MyError)
    f.write_text("just: [unclosed\n")
    with pytest.raises(MyError, match=r"c\.yaml is not valid YAML: line 2, column 1"):
        read_yaml_sections(f, MyError)
    f.write_bytes(b"name: \xff\n")
    with pytest.raises(MyError, match="not UTF-8"):
        read_yaml_sections(f, MyError)
    with pytest.raises(MyError, match="does not exist"):
        read_yaml_sections(tmp_path / "nope.yaml", MyError)


def test_nondefault_is_what_stage_keys_hash():
    # A section that differs from its field's default is listed by what differs from its own class's defaults.
    o = Outer(name="n", shifted=Inner(a=7, b=1.0), steps=(1, 2))
    assert nondefault(o) == {"name": "n", "shifted": {"a": 7, "b": 1.0}}
    assert nondefault(Outer(name="n")) == {"name": "n"}


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer section: declared once, nested by the pipeline, its flat keys still read
# ----------------------------------------------------------------------------------------------------------------------
def test_optimizer_section_is_declared_once():
    from minitron_jax.pipeline.config import CorrectionConfig, DistillSection
    from minitron_jax.train.config import OptimSection, RunConfig
    from minitron_jax.train.optim import OptimConfig

    names = [f.name for f in dataclasses.fields(OptimSection)]
    assert [f.name for f in dataclasses.fields(OptimConfig)][:len(names)] == names
    assert issubclass(OptimConfig, OptimSection)
    hints = {cls: {f.name: f.type for f in dataclasses.fields(cls)} for cls in (RunConfig, DistillSection,
                                                                             CorrectionConfig)}
    assert all(h["optim"] in (OptimSection, "OptimSection") for h in hints.values())
    paper = OptimSection()
    assert (paper.peak_lr, paper.min_lr, paper.warmup_steps) == (1e-4, 1e-5, 40)
    assert OptimConfig.of(paper, total_steps=100) == OptimConfig(total_steps=100)


def test_pipeline_optim_keys_flat_or_nested(tmp_path):
    from minitron_jax.pipeline import PipelineConfigError, load_pipeline_config

    demo = REPO / "configs" / "smollm2_135m_demo.yaml"
    pc = load_pipeline_config(demo)
    assert (pc.distill.optim.peak_lr, pc.distill.optim.min_lr, pc.distill.optim.warmup_steps) == (3e-4, 3e-5, 4)
    assert load_pipeline_config(demo, ["distill.peak_lr=5e-4"]).distill.optim.peak_lr == 5e-4
    assert load_pipeline_config(demo, ["distill.optim.b2=0.99"]).distill.optim.b2 == 0.99
    with pytest.raises(PipelineConfigError, match="distill.peak_lr and distill.optim.peak_lr are both given"):
        load_pipeline_config(demo, ["distill.optim.peak_lr=5e-4"])
    # The correction shares the distillation's optimizer except its schedule, whose defaults are its own.
    pc = load_pipeline_config(demo, ["teacher_correction.enabled=true", "distill.weight_decay=0.05"])
    c = pc.teacher_correction.optim
    assert (c.peak_lr, c.min_lr, c.warmup_steps, c.weight_decay) == (1e-4, 1e-5, 4, 0.05)
    # Defaults when a config says nothing: the pipeline's short-run schedule.
    f = tmp_path / "p.yaml"
    f.write_text("students: {w: {prune: {hidden: 480}}}\n")
    pc = load_pipeline_config(f)
    assert (pc.distill.optim.peak_lr, pc.distill.optim.min_lr, pc.distill.optim.warmup_steps) == (3e-4, 3e-5, 4)
    assert pc.distill.optim.weight_decay == 0.1 and pc.distill.mesh.fsdp == -1
