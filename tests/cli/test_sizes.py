"""One size notation across the commands (issue 21): WIDTHxHEIGHT as users type it, input and resized sizes in
the same words and order, a pixel count only where an option is called so, llm_convert's own `--max_pixels W,H`
written from it, and every size bounded with a one-line refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_vlhub
from vlhub.sizes import MAX_PIXEL_COUNT, MAX_SIDE


def test_720p_gives_the_vendor_flags_width_first() -> None:
    """1280x720 (720p landscape) is resized to 1288x728 for Qwen2-VL; llm_convert's --max_pixels reads
    "width,height" (its parse_max_pixels), so plan gives it 1288,728, and vlhub's own --max-pixels 1288x728."""
    result = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--target", "tpu-mlir")
    assert result.returncode == 0, result.stderr
    assert "input WxH       resized WxH" in result.stdout
    assert "image 1280x720  1288x728" in result.stdout
    assert "--max_pixels 1288,728 --seq_length 1840" in result.stdout
    assert "--to tpu-mlir --seq-length 1840 --max-pixels 1288x728" in result.stdout


def test_a_height_first_size_is_a_portrait_image_and_shown_as_one() -> None:
    """VastModelZOO writes 720p as 720x1280, height first: typed here it is a 720-wide portrait image, and every
    size shown says so (not a silently swapped --max_pixels)."""
    result = run_vlhub("plan", "qwen2-vl-7b", "--image", "720x1280", "--target", "tpu-mlir")
    assert "image 720x1280  728x1288" in result.stdout and "--max_pixels 728,1288" in result.stdout
    help_text = run_vlhub("plan", "-h").stdout
    assert "width first: 1280x720 is 720p landscape" in " ".join(help_text.split())


def test_tpu_mlir_takes_wxh_and_writes_llm_convert_s_w_h(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "tpu"
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--seq-length", "128", "--max-pixels",
                       "168x112", "--quantize", "bf16", "--no-smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr
    assert "--max_pixels 168,112 -o ./compiled" in (out / "compile.sh").read_text()
    assert "images resized up to 168x112 (width x height" in (out / "README.md").read_text()


def test_llm_convert_s_own_spelling_is_read_with_a_one_line_note(tiny_qwen2_vl: Path) -> None:
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--seq-length", "128", "--max-pixels",
                       "168,112", "--quantize", "bf16", "--dry-run")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [("note: --max-pixels 168,112: llm_convert's spelling, read as width,height; vlhub writes sizes "
                      "WxH: --max-pixels 168x112")]


@pytest.mark.parametrize(("args", "says"), [
    (["plan", "qwen2-vl-7b", "--image", f"{MAX_SIDE + 1}x720"], f"from 1 to {MAX_SIDE} pixels"),
    (["plan", "qwen2-vl-7b", "--image", "1280x0"], f"from 1 to {MAX_SIDE} pixels"),
    (["plan", "qwen2-vl-7b", "--image", "1280,720"], "write WIDTHxHEIGHT in pixels, width first"),
    (["plan", "qwen2-vl-7b", "--video", f"640x{MAX_SIDE * 2}", "--frames", "8"], "from 1 to"),
    (["plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", str(MAX_PIXEL_COUNT + 1)],
     f"a pixel count from 1 to {MAX_PIXEL_COUNT}"),
    (["plan", "qwen2-vl-7b", "--image", "1280x720", "--min-pixels", str(MAX_PIXEL_COUNT * 2)], "--min-pixels"),
    (["check", "qwen2-vl-7b", "--target", "vamc", "--image", "-1x720"], "from 1 to"),
    (["convert", "tiny-qwen2-vl", "--to", "vamc", "--image", "1280x99999", "--dry-run"], "from 1 to"),
    (["convert", "tiny-qwen2-vl", "--to", "vamc", "--max-pixels", "1280x720", "--dry-run"],
     "the largest image's pixel count, e.g. --max-pixels 921600 (1280x720), or --image 1280x720"),
    # a size typed where a pixel count is asked for: its count in one line (plan's was click's four-line usage
    # error), and llm_convert's W,H is a size too, not 1,280,720 pixels (vamc took it as that count)
    (["plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "1280x720"],
     ("--max-pixels 1280x720: the processor's max_pixels, the largest image's pixel count, e.g. --max-pixels 921600 "
      "(1280x720)")),
    (["plan", "qwen2-vl-7b", "--image", "1280x720", "--min-pixels", "56X56"],
     ("--min-pixels 56X56: the processor's min_pixels, the smallest image's pixel count, e.g. --min-pixels 3136 "
      "(56x56)")),
    (["plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", "lots"], "--max-pixels 'lots': the processor's"),
    (["convert", "tiny-qwen2-vl", "--to", "vamc", "--max-pixels", "1280,720", "--dry-run"],
     "--max-pixels 1280,720: for --to vamc the largest image's pixel count, e.g. --max-pixels 921600 (1280x720)"),
    (["convert", "tiny-qwen2-vl", "--to", "vamc", "--max-pixels", str(MAX_PIXEL_COUNT + 1), "--dry-run"],
     "a pixel count from 1"),
    (["convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--max-pixels", "168x0", "--dry-run"], "from 1 to"),
    (["convert", "tiny-qwen2-vl", "--to", "tpu-mlir", "--max-pixels", "100x100", "--dry-run"],
     "--max-pixels 100x100: W and H must be multiples of 28"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_sizes_out_of_bounds_are_one_line_exit_2(args: list[str], says: str, tiny_qwen2_vl: Path) -> None:
    assert says in one_line_error(run_vlhub(*args))


def test_a_pixel_count_may_be_written_with_separators() -> None:
    """921_600 is 921600, and so is 1,003,520 read as 1003520; plan and vamc read them the same way."""
    for plain, written in (("921600", "921_600"), ("1003520", "1,003,520")):
        expected = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", plain, "--json")
        result = run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720", "--max-pixels", written, "--json")
        assert result.returncode == 0 and result.stdout == expected.stdout, result.stderr


@pytest.mark.parametrize("command", [["plan", "qwen2-vl-7b", "--image", "1280x720"],
                                     ["convert", "tiny-qwen2-vl", "--to", "vamc", "--dry-run"]])
def test_one_comma_before_three_digits_is_answered_with_both_readings(command: list[str], tiny_qwen2_vl: Path) -> None:
    """640,480 is llm_convert's size as much as a count with a thousands separator: it was read as 640480 pixels."""
    line = one_line_error(run_vlhub(*command, "--max-pixels", "640,480"))
    assert "640480 pixels" in line and "640,480 (307200 pixels)" in line, line


@pytest.mark.parametrize("written", ["\u00b2", "\u0663\u0660\u0660"])  # a superscript two; Arabic-Indic 300
def test_digits_python_knows_but_int_does_not_are_one_line(written: str) -> None:
    assert "--max-pixels" in one_line_error(run_vlhub("plan", "qwen2-vl-7b", "--image", "1280x720",
                                                      "--max-pixels", written))


def test_the_vamc_readme_names_its_images_as_plan_does(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "vamc"
    result = run_vlhub("convert", "tiny-qwen2-vl", "--to", "vamc", "--image", "1280x720", "--no-smoke", "--out",
                       str(out))
    assert result.returncode == 0, result.stderr
    readme = (out / "README.md").read_text()
    assert "input 1280x720: resized 1288x728, 4784 patches" in readme
    assert "comes back in 1 column chunk (128)" in readme  # the tiny model's 128 columns: one chunk
    assert "image 1280x720  1288x728" in run_vlhub("plan", "tiny-qwen2-vl", "--image", "1280x720").stdout


def test_a_one_frame_video_is_one_frame() -> None:
    result = run_vlhub("plan", "tiny-qwen2-vl", "--video", "1280x720", "--frames", "1")
    assert result.returncode == 0, result.stderr
    assert "video 1280x720, 1 frame " in result.stdout
    two = run_vlhub("plan", "tiny-qwen2-vl", "--video", "1280x720", "--frames", "2")
    assert "video 1280x720, 2 frames" in two.stdout
