"""REVERSE_SD_IMAGES folders: subfolders versioned by content, read as parts; names a partition cannot take."""

from __future__ import annotations

from own_images import make_folder, write_a1111

from pipeline.data.own_images import folder_problem, list_folders, read_folder


def test_folders_are_versioned_by_content_and_read_as_parts(tmp_path):
    make_folder(tmp_path, "day1", 3)
    make_folder(tmp_path, "day2", 3)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "loose.png").write_bytes(b"")  # a file at the top is no folder
    before = list_folders(tmp_path)
    assert sorted(before) == ["day1", "day2"]
    write_a1111(tmp_path / "day2" / "00000.png", "another prompt entirely", colour="blue")
    after = list_folders(tmp_path)
    assert after["day1"] == before["day1"] and after["day2"] != before["day2"]
    (tmp_path / "day1" / "00001.txt").write_text("a sidecar changes the content too")
    assert list_folders(tmp_path)["day1"] != before["day1"]

    result = read_folder(tmp_path / "day1", "day1", image_size=32)
    frame = result.frame
    assert frame["image_id"].to_list() == ["day1/00000.png", "day1/00001.png", "day1/00002.png"]
    assert set(frame["part"]) == {"day1"} and frame["prompt"][1] == "a sidecar changes the content too"
    assert frame["generator"].to_list() == ["AUTOMATIC1111", "sidecar", "AUTOMATIC1111"]
    assert result.skipped == [{"id": "day1/no-metadata.png", "reason": "no prompt metadata"}]


def test_folder_names_a_partition_cannot_take_are_refused():
    assert folder_problem("2024-05-01") is None
    assert folder_problem(".cache") and folder_problem("a,b") and folder_problem("x\ny")
