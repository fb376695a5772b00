"""The demo end to end. Its checks (``helpers.check_demo_output``) also run on ``make demo`` in
CI and on the demo made inside the container image (tests/check_demo.py)."""

from __future__ import annotations

import os

import pytest

from helpers import check_demo_output
from pyact_torch.cli import main


@pytest.mark.slow
def test_demo_with_the_gcs_emulator(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--gcs-emulator"]) == 0
    metrics = check_demo_output(out)
    printed = capsys.readouterr().out
    assert f"test accuracy {metrics['accuracy']:.3f}" in printed
    assert "detection in TestDetection at tIoU 0.5: segment F1" in printed and ", mAP 0." in printed
    assert "gs://pyact-demo/run" in printed and "gs://pyact-demo/shards" in printed
    assert not os.path.exists(os.path.join(out, "shards"))  # they went to the bucket


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not an earlier demo's output" in capsys.readouterr().err
    assert precious.read_text() == "keep me"


def _earlier_demo(folder) -> None:
    """A folder as an earlier demo leaves it: its files and the record of them."""
    from pyact_torch.demo import _write_record

    for name in ("metrics.json", "raw/Train/s0/asl-z/color_0.png", "run/final.pt"):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("demo output")
    _write_record(str(folder))


@pytest.mark.parametrize("added", ["report.md", "my-experiment/notes.txt", "raw/Train/s0/notes.txt"])
def test_a_new_demo_never_deletes_files_it_did_not_write(added, tmp_path, capsys):
    """On main before the fix the marked folder was removed whole, with the user's files."""
    out = tmp_path / "demo"
    _earlier_demo(out)
    (out / added).parent.mkdir(parents=True, exist_ok=True)
    (out / added).write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files no demo wrote" in err and added in err and err.count("\n") == 1
    assert (out / added).read_text() == "mine"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing deleted at all


def test_an_earlier_demo_is_cleared_file_by_file(tmp_path):
    from pyact_torch.demo import clear_earlier_demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    (tmp_path / "outside.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(out)
    clear_earlier_demo(os.path.realpath(link), str(link))  # --out a link to the earlier demo
    assert list(out.iterdir()) == [] and (tmp_path / "outside.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "record",
    [
        '{"format": "pyact-demo-files/1", "files": ["../outside.txt"]}',
        '{"format": "pyact-demo-files/1", "files": ["/etc/hostname"]}',
        "",
    ],
)
def test_a_demo_record_naming_files_outside_its_folder_is_refused(record, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".pyact-demo").write_text(record)
    (tmp_path / "outside.txt").write_text("keep")
    assert main(["demo", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --out ")
    assert (tmp_path / "outside.txt").read_text() == "keep"


def test_a_demo_record_never_reaches_through_a_link(tmp_path):
    """A record naming ``raw/x`` where ``raw`` is (now) a link to a folder elsewhere: the link
    goes, the folder it points to keeps its files."""
    from pyact_torch.demo import clear_earlier_demo

    out, elsewhere = tmp_path / "demo", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "x").write_text("keep")
    (out / "raw").symlink_to(elsewhere)
    (out / ".pyact-demo").write_text('{"format": "pyact-demo-files/1", "files": ["raw", "raw/x"]}')
    clear_earlier_demo(str(out), str(out))
    assert (elsewhere / "x").read_text() == "keep" and not os.path.lexists(out / "raw")


def test_a_killed_demo_is_named_as_such_and_its_record_never_names_itself(tmp_path, capsys):
    from pyact_torch.demo import _write_record, clear_earlier_demo

    out = tmp_path / "demo"
    _earlier_demo(out)
    _write_record(str(out), complete=False)  # a step's boundary; then kill -9 in the next step
    (out / "shards").mkdir()
    (out / "shards" / "train-000000.tar").write_text("unrecorded")
    assert main(["demo", "--out", str(out)]) == 2
    assert "an earlier demo was killed before it recorded all its files" in capsys.readouterr().err
    assert (out / "shards" / "train-000000.tar").exists()
    (out / ".pyact-demo").write_text('{"format": "pyact-demo-files/1", "files": ["metrics.json", ".pyact-demo"]}')
    (out / "shards" / "train-000000.tar").unlink()
    for name in ("raw/Train/s0/asl-z/color_0.png", "run/final.pt"):
        (out / name).unlink()
    clear_earlier_demo(str(out), str(out))  # the record naming the marker itself is harmless
    assert not [p for p in out.rglob("*") if not p.is_dir()]  # empty folders it did not record may stay
