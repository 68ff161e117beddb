"""The generated sample mirror follows its settings (issue 27, items 10 and 14): its directory is named by the
sample's size (and, under an object-store root, by the root), so a changed REVERSE_SD_SAMPLE_PARTS or
..._IMAGES_PER_PART is new data; and a dry run lists the parts it would hold without writing anything."""

from __future__ import annotations

from pathlib import Path

from resources import build_resources, load_settings


def _env(home: Path | str, parts: int, images: int) -> dict[str, str]:
    return {
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": str(home),
        "REVERSE_SD_SAMPLE_PARTS": str(parts),
        "REVERSE_SD_SAMPLE_IMAGES_PER_PART": str(images),
    }


def test_the_mirror_directory_is_keyed_by_the_settings_and_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = {(p, i): load_settings(_env(tmp_path / "home", p, i)) for p, i in [(4, 250), (6, 250), (4, 100)]}
    dirs = {key: s.sample_mirror_dir for key, s in local.items()}
    assert len(set(dirs.values())) == 3
    for settings in local.values():
        assert Path(settings.sample_mirror_dir).parent == tmp_path / "home" / "sample_mirror"
        assert settings.uses_generated_sample and settings.diffusiondb == settings.sample_mirror_dir
    one, other = (load_settings(_env(f"s3://bucket/{name}", 4, 250)).sample_mirror_dir for name in ("a", "b"))
    assert one != other  # two object-store roots never share a mirror
    assert Path(one).parent == tmp_path / "cache" / "reverse-sd" / "sample_mirror"


def test_a_changed_sample_size_is_new_data(tmp_path):
    """More parts: the new parts appear, the old ones keep their versions (the generator is deterministic);
    more images per part: every part is another version.  Before, the first mirror was kept for ever."""

    def listed(parts: int, images: int) -> dict[str, str]:
        return (
            build_resources(load_settings(_env(tmp_path / "home", parts, images)))["diffusiondb"].source().list_parts()
        )

    first = listed(1, 2)
    assert list(first) == ["part-000001"]
    grown = listed(2, 2)
    assert list(grown) == ["part-000001", "part-000002"]
    assert grown["part-000001"] == first["part-000001"]
    bigger = listed(1, 3)
    assert list(bigger) == ["part-000001"] and bigger["part-000001"] != first["part-000001"]


def test_a_dry_run_lists_the_parts_it_would_generate_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    resource = build_resources(load_settings(_env(home, 2, 2)))["diffusiondb"]
    planned = resource.list_parts(create=False)
    assert list(planned) == ["part-000001", "part-000002"]
    assert all(version.startswith("not-generated:") for version in planned.values())
    assert not tmp_path.joinpath("home").exists()
    assert not load_settings(_env(home, 2, 2)).sample_mirror_generated

    generated = resource.list_parts()  # a real run generates the mirror
    assert load_settings(_env(home, 2, 2)).sample_mirror_generated
    assert resource.list_parts(create=False) == generated  # and a dry run then reads it as it is
    assert set(generated.values()).isdisjoint(planned.values())
