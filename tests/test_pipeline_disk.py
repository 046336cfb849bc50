"""The pipeline's disk floor and peak (pipeline.disk) from configs alone, against sizes measured on real runs."""

from pathlib import Path

import pytest

from minitron_jax.pipeline import load_pipeline_config
from minitron_jax.pipeline.disk import CHECKPOINT_BYTES_PER_PARAM, disk_plan, gguf_bytes_per_param, hf_itemsize

DEMO = Path(__file__).resolve().parents[1] / "configs" / "smollm2_135m_demo.yaml"
# The demo's teacher and students (the preflight's "student width: 89.98M params" lines, exact counts).
TEACHER, WIDTH, DEPTH = 134_515_008, 89_977_440, 92_033_856


def test_gguf_bytes_per_param_are_ggml_block_sizes():
    assert gguf_bytes_per_param("f32") == 4 and gguf_bytes_per_param("f16") == 2
    assert gguf_bytes_per_param("q8_0") == 34 / 32 and gguf_bytes_per_param("q4_0") == 18 / 32


def test_demo_floor_is_under_the_measured_end_and_the_peak_over_the_measured_peak():
    """docs/pipeline.md ("Disk"): the demo's run directory held 3,243,628 KiB at its end and 3,686,024 KiB at its
    peak (du every 2-3 s). The floor must stay under the first (else a run that fits would be refused); the peak
    is an upper estimate."""
    pc = load_pipeline_config(DEMO)
    plan = disk_plan(pc, TEACHER, 4, True, {"width": WIDTH, "depth": DEPTH})
    names = [what for what, _ in plan.items]
    assert names == ["teacher", "prune.width", "distill.width", "sft.width", "export.width", "export.width gguf",
                     "prune.depth", "distill.depth", "export.depth", "export.depth gguf"]
    assert 0.95 * 3_243_628 * 1024 < plan.end <= 3_243_628 * 1024
    assert plan.peak >= 3_686_024 * 1024
    assert plan.checkpoint == CHECKPOINT_BYTES_PER_PARAM * 2 * DEPTH  # the largest trainer stage, twice for a save


def test_correction_keep_checkpoints_and_export_change_the_plan():
    pc = load_pipeline_config(DEMO, ["teacher_correction.enabled=true", "keep_checkpoints=true", "export.gguf=null",
                                     "export_dtype=bfloat16", "sft.enabled=false"])
    plan = disk_plan(pc, TEACHER, 4, False, {"width": WIDTH})
    assert dict(plan.items) == {"correction": TEACHER * 2, "prune.width": WIDTH * 2, "distill.width": WIDTH * 2,
                                "export.width": WIDTH * 2}
    assert plan.checkpoint == CHECKPOINT_BYTES_PER_PARAM * (TEACHER + WIDTH + TEACHER)  # each kept, + one replacing


@pytest.mark.parametrize("text,size", [('{"torch_dtype": "float32"}', 4), ('{"dtype": "bfloat16"}', 2),
                                       ('{}', 2), ("not json", 2)])
def test_hf_itemsize_never_overstates(tmp_path, text, size):
    (tmp_path / "config.json").write_text(text)
    assert hf_itemsize(tmp_path) == size
