"""Label files (OpenCV FileStorage XML) and frame decoding rules."""

import numpy as np
import pytest

from pyact_torch.data.frames import depth_to_uint8
from pyact_torch.data.labels import LabelFileError, Segment, parse_label_file
from pyact_torch.data.synthetic import write_label_file


def write(tmp_path, text):
    path = tmp_path / "a.xml"
    path.write_text(text)
    return str(path)


def test_reads_what_opencv_writes(tmp_path):
    path = str(tmp_path / "x.xml")
    write_label_file(path, "asl-z", [(3, 6), (20, 9)], 40)
    assert parse_label_file(path) == (Segment(3, 6), Segment(20, 9))


def test_ignores_other_elements_and_key_names(tmp_path):
    path = write(
        tmp_path,
        """<?xml version="1.0"?>
<opencv_storage>
<whatever type_id="x">7</whatever>
<names><_>foo</_><_>bar</_></names>
<gestures>
  <_><len>12</len><pos>4</pos><extra>1</extra></_>
  <_><pos> 30 </pos><len>6</len></_>
</gestures>
</opencv_storage>""",
    )
    assert parse_label_file(path) == (Segment(4, 12), Segment(30, 6))


@pytest.mark.parametrize(
    "body, message",
    [
        ("<s><_><pos>4</pos></_></s>", "without <len>"),
        ("<s><_><len>4</len></_></s>", "without <pos>"),
        ("<s><_><pos>4.5</pos><len>6</len></_></s>", "not an integer"),
        ("<s><_><pos>4</pos><len></len></_></s>", "not an integer"),
        ("<s><_><pos>4</pos><len>0</len></_></s>", "not a valid range"),
        ("<s><_><pos>4</pos><len>6</len></_>", "not a valid XML"),
    ],
)
def test_broken_segments_are_errors(tmp_path, body, message):
    path = write(tmp_path, f"<opencv_storage>{body}</opencv_storage>")
    with pytest.raises(LabelFileError, match=message):
        parse_label_file(path)


def test_depth_mapping_is_linear_near_bright_and_zero_outside():
    depth = np.array([[150, 1000, 575, 0, 2000, 149, 320]], np.uint16)
    got = depth_to_uint8(depth, (150, 1000))
    # 255 * (1000 - d) / 850, rounded; no reading and out of range -> 0
    assert got.tolist() == [[255, 0, 128, 0, 0, 0, 204]]


def test_a_label_file_is_bounded_before_it_is_parsed(tmp_path):
    path = tmp_path / "huge.xml"
    segment = "<_><pos>1</pos><len>2</len></_>"
    path.write_text("<opencv_storage>" + segment * 40_000 + "</opencv_storage>")  # 1.3 MB
    with pytest.raises(LabelFileError, match="larger than"):
        parse_label_file(str(path))
    path.write_text("<opencv_storage>" + segment * 30_000 + "</opencv_storage>")  # 0.99 MB: still read
    assert len(parse_label_file(str(path))) == 30_000


def test_a_segment_may_name_its_own_action(tmp_path):
    write_label_file(str(tmp_path / "rec.xml"), "rec", [(3, 6), (20, 8)], 40, labels=["asl-z", "ui-swipe"])
    assert parse_label_file(str(tmp_path / "rec.xml")) == (Segment(3, 6, "asl-z"), Segment(20, 8, "ui-swipe"))
    path = write(
        tmp_path,
        "<segs><_><pos>1</pos><len>6</len><gesture>asl-j</gesture></_>"
        '<_><pos>9</pos><len>6</len><class>"ui-click"</class><name>asl-z</name></_>'
        "<_><pos>20</pos><len>6</len><comment>x</comment></_></segs>",
    )
    # the first tag of label, name, class, action, gesture wins; quotes are OpenCV's; none: the folder's
    assert parse_label_file(path) == (Segment(1, 6, "asl-j"), Segment(9, 6, "asl-z"), Segment(20, 6))


@pytest.mark.parametrize("name", ["no-action", "../../etc", "", "a b"])
def test_a_segment_action_that_is_no_class_name_is_an_error(tmp_path, name):
    path = write(tmp_path, f"<segs><_><pos>1</pos><len>6</len><label>{name}</label></_></segs>")
    with pytest.raises(LabelFileError, match="not an action name"):
        parse_label_file(path)


def test_testdetection_recordings_are_found_directly_or_one_level_down(tmp_path):
    from pyact_torch.data.labels import scan_detection

    def recording(rel, labels):
        folder = tmp_path / rel
        folder.mkdir(parents=True)
        for frame in range(30):
            for kind in ("color", "depth", "confi"):
                (folder / f"{kind}_{frame}.png").write_bytes(b"")  # the scan checks names, not pixels
        write_label_file(str(folder) + ".xml", folder.name, [(2, 6), (15, 6)], 30, labels=labels)

    recording("TestDetection/connie", ["asl-z", "ui-swipe"])
    recording("TestDetection/dale/take0", ["asl-j", "asl-z"])
    recording("TestDetection/dale/take1", None)  # segments without their action: refused, named
    found, bad = scan_detection(str(tmp_path))
    assert [r.path for r in found] == ["TestDetection/connie", "TestDetection/dale/take0"]
    assert [g.action for g in found[1].segments] == ["asl-j", "asl-z"]
    assert [b.path for b in bad] == ["TestDetection/dale/take1"] and "names no action" in bad[0].reason
    assert bad[0].file.endswith("take1.xml")
