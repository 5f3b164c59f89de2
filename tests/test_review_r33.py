"""Round 33's review: bugs found in this round's changes, each shown by a test that failed before
its fix.

- a folder file (or a task) named ``.git::$INDEX_ALLOCATION`` (an NTFS stream of the ``.git``
  folder, which Windows writes into as ``.git``: Git's CVE-2019-1352) was taken, though ``.git``
  in any case, with trailing dots or as its 8.3 short name was refused.
"""

from __future__ import annotations

import pytest

import tallpack
from tallpack.folders import check_file_name
from tallpack.manifest import task_name_problem

from test_hostile_r33 import _as_repository, folders  # noqa: F401 (a fixture)

NTFS_STREAMS = [".git::$INDEX_ALLOCATION", ".GIT:x", ".git.::$INDEX_ALLOCATION", "git~1::$INDEX_ALLOCATION",
                ".hg::$INDEX_ALLOCATION"]


@pytest.mark.parametrize("folder", NTFS_STREAMS)
def test_a_repositorys_folder_as_an_ntfs_stream_is_refused(folders, tmp_path, folder):  # noqa: F811
    """``.git::$INDEX_ALLOCATION/config`` is ``.git/config`` on Windows: refused at open as
    ``.git/config`` is, in one line naming the archive, the task and the file."""
    arch = _as_repository(folders / "f.tallpack", tmp_path / "evil.tallpack", folder)
    with pytest.raises(tallpack.FormatError) as e:
        tallpack.open(arch)
    text = str(e.value)
    assert text.startswith(f"{arch}: task 'a': file name '{folder}/") and "a repository's" in text, text
    assert "\n" not in text


@pytest.mark.parametrize("task", NTFS_STREAMS)
def test_a_task_named_as_a_repositorys_folder_stream_is_refused(task):
    """``unpack --all`` writes task ``.git::$INDEX_ALLOCATION`` into ``OUT/.git`` on Windows."""
    assert "a repository's folder" in (task_name_problem(task) or "")


@pytest.mark.parametrize("name", ["ab:c/config.json", "git:x/y", ".gitx:y/z", ".github/workflows/a.yml", "x/.gitignore"])
def test_colons_elsewhere_are_names_as_any_other(name):
    """Only a repository's folder (before any stream name) is refused; other names with a colon stay."""
    assert check_file_name(name) == name
