"""Copying the first records of a split, with their media, into a self-contained folder."""

import numpy as np
from PIL import Image

from kimivl.data.formats import iter_records, write_records
from kimivl.data.subset import copy_subset


def _pixels(path):
    return np.asarray(Image.open(path)).tolist()


def test_media_of_one_name_in_two_folders_keep_their_own_copies(tmp_path):
    """``a/1.png`` and ``b/1.png`` were both copied to ``media/colours_1.png``: one record then showed the other's
    image."""
    split = tmp_path / "split"
    for folder, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (split / folder).mkdir(parents=True)
        Image.fromarray(np.full((28, 28, 3), colour, dtype=np.uint8)).save(split / folder / "1.png")
    chats = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": f"{f}/1.png"}]},
                {"role": "assistant", "content": f},
            ]
        }
        for f in ("a", "b", "a")
    ]
    write_records(split / "colours.jsonl", chats)
    assert copy_subset(split, tmp_path / "out", per_task=3) == 3
    copies = [r["messages"][0]["content"][0]["image"] for r in iter_records(tmp_path / "out" / "colours.jsonl")]
    assert len(set(copies)) == 2 and copies[0] == copies[2]  # one copy of a/1.png, used twice
    for copy, folder in zip(copies, ("a", "b", "a")):
        assert _pixels(copy) == _pixels(split / folder / "1.png")
    assert copies[0].endswith("/media/colours_1.png")  # the first keeps the plain name
    assert sorted(p.name for p in (tmp_path / "out" / "media").iterdir()) == sorted(
        copy.rsplit("/", 1)[1] for copy in set(copies)
    )
