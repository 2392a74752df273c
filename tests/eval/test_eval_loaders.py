"""Benchmark loaders on tiny fixture files in each distribution format."""

import base64
import csv
import hashlib
import io
import json
import os
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pymupdf
import pytest
from PIL import Image

from kimivl.data.formats import DataError
from kimivl.eval import mathvista, mmlongbench, mmmu, ocrbench, screenspot, videomme
from kimivl.eval.tables import RowError, Sample, Skipped, image_bytes, iter_rows, literal_list, table_files


def png(w=40, h=30, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def split(items):
    items = list(items)
    return ([i for i in items if isinstance(i, Sample)], {i.index: i.reason for i in items if isinstance(i, Skipped)})


def images_of(sample):
    return [p["image"] for p in sample.messages[0]["content"] if p["type"] == "image"]


def text_of(sample):
    return sample.messages[0]["content"][-1]["text"]


def test_mmmu_tsv_base64_multi_image_shared_image_and_malformed_rows(tmp_path):
    red, blue = png(), png(colour=(0, 0, 255))
    rows = [
        {
            "index": "0",
            "question": "Which city? <image 1>",
            "A": "Paris",
            "B": "Rome",
            "C": "",
            "answer": "B",
            "image": b64(red),
            "category": "Geo",
        },
        {
            "index": "1",
            "question": "Compare <image 1> and <image 2>",
            "A": "same",
            "B": "different",
            "answer": "B",
            "image": str([b64(red), b64(blue)]),
            "category": "Art",
        },
        {
            "index": "2",
            "question": "Same picture again",
            "A": "x",
            "B": "y",
            "answer": "A",
            "image": "0",
            "category": "Geo",
        },
        {"index": "3", "question": "Bad answer", "A": "x", "B": "y", "answer": "Z", "image": b64(red)},
        {"index": "4", "question": "Bad image", "A": "x", "B": "y", "answer": "A", "image": "!!not base64!!" * 8},
        {"index": "5", "question": "How many?", "answer": "3", "image": b64(red)},
    ]
    samples, skipped = split(mmmu.load(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)))
    assert [s.index for s in samples] == [0, 1, 2, 5]
    assert set(skipped) == {3, 4} and "option letters" in skipped[3] and "base64" in skipped[4]
    first, pair, shared, open_q = samples
    assert images_of(first) == [red] and images_of(pair) == [red, blue] and images_of(shared) == [red]
    assert first.meta["options"] == {"A": "Paris", "B": "Rome"} and first.meta["group"] == "Geo"
    assert "A. Paris\nB. Rome\nAnswer with the option's letter" in text_of(first)
    assert open_q.meta == {"type": "open", "answer": ["3"], "seed": "5", "group": ""}


def test_mmmu_tsv_with_a_split_column_reads_the_validation_rows(tmp_path):
    """VLMEvalKit's MMMU_DEV_VAL.tsv holds the dev split too; MMMU's reported number is over validation alone. A dev
    row's image still serves a validation row that refers to it by index."""
    red = png()
    row = {"question": "Which?", "A": "x", "B": "y", "answer": "A", "category": "Art"}
    rows = [
        {**row, "index": "0", "split": "dev", "image": b64(red)},
        {**row, "index": "1", "split": "validation", "image": "0"},
        {**row, "index": "2", "split": "validation", "image": b64(red)},
    ]
    samples, skipped = split(mmmu.load(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)))
    assert [s.index for s in samples] == [1, 2] and not skipped
    assert images_of(samples[0]) == [red]


def test_mmmu_parquet_image_structs(tmp_path):
    rows = [
        {
            "id": "validation_Art_1",
            "question": "Style of <image 1>?",
            "options": "['Baroque', 'Cubism']",
            "answer": "B",
            "question_type": "multiple-choice",
            "image_1": {"bytes": png(), "path": "a.png"},
            "image_2": None,
        },
        {
            "id": "validation_Math_2",
            "question": "Area?",
            "options": "[]",
            "answer": "['12', '12.0']",
            "question_type": "open",
            "image_1": {"bytes": png(), "path": "b.png"},
            "image_2": None,
        },
    ]
    samples, skipped = split(mmmu.load(write_parquet(tmp_path / "validation.parquet", rows)))
    assert not skipped and [s.index for s in samples] == ["validation_Art_1", "validation_Math_2"]
    assert samples[0].meta["group"] == "Art" and samples[0].meta["options"] == {"A": "Baroque", "B": "Cubism"}
    assert samples[1].meta["answer"] == ["12", "12.0"] and len(images_of(samples[1])) == 1


def test_directory_of_parquet_shards(tmp_path):
    for i, subject in enumerate(["Art", "Math"]):
        (tmp_path / subject).mkdir()
        write_parquet(
            tmp_path / subject / "validation-00000.parquet",
            [
                {
                    "id": f"validation_{subject}_{i}",
                    "question": "q",
                    "options": "['a', 'b']",
                    "answer": "A",
                    "question_type": "multiple-choice",
                    "image_1": {"bytes": png(), "path": None},
                }
            ],
        )
    samples, _ = split(mmmu.load(tmp_path))
    assert [s.index for s in samples] == ["validation_Art_0", "validation_Math_1"]


def test_mathvista_parquet_and_tsv(tmp_path):
    rows = [
        {
            "pid": "1",
            "query": "Hint: ...\nQuestion: How many?",
            "question": "How many?",
            "decoded_image": {"bytes": png(), "path": "images/1.jpg"},
            "choices": None,
            "answer": "3",
            "question_type": "free_form",
            "answer_type": "integer",
            "precision": None,
            "metadata": {"task": "figure QA"},
        },
        {
            "pid": "2",
            "query": "Which?",
            "question": "Which?",
            "decoded_image": {"bytes": png(), "path": None},
            "choices": ["1.5", "2.5"],
            "answer": "2.5",
            "question_type": "multi_choice",
            "answer_type": "float",
            "precision": 1.0,
            "metadata": {"task": "math word problem"},
        },
        {
            "pid": "3",
            "query": "?",
            "question": "?",
            "decoded_image": {"bytes": png(), "path": None},
            "choices": None,
            "answer": "1",
            "question_type": "essay",
            "answer_type": "text",
            "precision": None,
            "metadata": {},
        },
    ]
    samples, skipped = split(mathvista.load(write_parquet(tmp_path / "testmini.parquet", rows)))
    assert list(skipped) == [3] and "question_type" in skipped[3]
    assert samples[0].meta["answer_type"] == "integer" and text_of(samples[0]).startswith("Hint: ...")
    assert samples[1].meta["answer"] == "B" and samples[1].meta["group"] == "math word problem"
    tsv = [
        {
            "index": "7",
            "image": b64(png()),
            "question": "Pick one",
            "choices": "['red', 'blue']",
            "answer": "blue",
            "answer_option": "B",
            "question_type": "multi_choice",
            "answer_type": "text",
            "precision": "",
            "task": "figure QA",
        }
    ]
    [sample], skipped = split(mathvista.load(write_tsv(tmp_path / "MathVista_MINI.tsv", tsv)))
    assert not skipped and sample.meta["answer"] == "B" and "(B) blue" in text_of(sample)


def test_ocrbench_tsv_and_parquet(tmp_path):
    tsv = [
        {
            "index": "0",
            "image": b64(png()),
            "question": "What is written?",
            "answer": "['STOP', 'stop sign']",
            "category": "Regular Text Recognition",
        },
        {
            "index": "1",
            "image": b64(png()),
            "question": "Formula?",
            "answer": "['x ^ 2']",
            "category": "Handwritten Mathematical Expression Recognition",
        },
        {"index": "2", "image": b64(png()), "question": "Empty", "answer": "[]", "category": "x"},
    ]
    samples, skipped = split(ocrbench.load(write_tsv(tmp_path / "OCRBench.tsv", tsv)))
    assert list(skipped) == [2]
    assert samples[0].meta["answers"] == ["STOP", "stop sign"] and not samples[0].meta["hme"]
    assert samples[1].meta["hme"]
    rows = [
        {
            "dataset": "HME100k",
            "question": "Formula?",
            "question_type": "x",
            "answer": ["a + b"],
            "image": {"bytes": png(), "path": None},
        }
    ]
    [sample], _ = split(ocrbench.load(write_parquet(tmp_path / "ocrbench.parquet", rows)))
    assert sample.index == 0 and sample.meta["hme"]


def test_every_task_pickles_for_worker_processes():
    """screenspot's loaders were closures: its two tasks could not go to spawned workers or a process pool."""
    from kimivl.eval.tasks import TASKS

    assert [pickle.loads(pickle.dumps(task)).name for task in TASKS.values()] == list(TASKS)


def test_screenspot_conventions_per_loader(tmp_path):
    """The same element (pixels x 40..100, y 20..50 of a 200x100 screenshot) in each release's convention."""
    image = png(200, 100)
    want = [0.2, 0.2, 0.5, 0.5]
    tsv = [
        {
            "index": "0",
            "image": b64(image),
            "question": "open menu",
            "bbox": "[40, 20, 60, 30]",
            "data_type": "icon",
            "data_source": "web",
            "group": "Web",  # ScreenSpot-Pro's grouping: ScreenSpot's rows group by data_type alone
        },
        {"index": "1", "image": b64(image), "question": "broken", "bbox": "[40, 20]", "data_type": "icon"},
    ]
    samples, skipped = split(screenspot.loader("screenspot")(write_tsv(tmp_path / "ScreenSpot_Web.tsv", tsv)))
    assert samples[0].meta["box"] == pytest.approx(want) and samples[0].meta["size"] == [200, 100]
    assert list(skipped) == [1] and "4 numbers" in skipped[1]
    assert "open menu" in text_of(samples[0]) and samples[0].meta["group"] == "icon"

    hub = [
        {
            "file_name": "a.png",
            "bbox": [0.2, 0.2, 0.5, 0.5],
            "instruction": "open menu",
            "data_type": "text",
            "image": {"bytes": image, "path": None},
        }
    ]
    [sample], _ = split(screenspot.loader("screenspot")(write_parquet(tmp_path / "test.parquet", hub)))
    assert sample.meta["box"] == pytest.approx(want)

    pro = tmp_path / "pro"
    (pro / "annotations").mkdir(parents=True)
    (pro / "images").mkdir()
    (pro / "images" / "shot.png").write_bytes(image)
    ann = [
        {
            "id": "p0",
            "img_filename": "shot.png",
            "bbox": [40, 20, 100, 50],
            "img_size": [200, 100],
            "instruction": "open menu",
            "ui_type": "icon",
            "group": "Dev",
        },
        {"id": "p1", "img_filename": "missing.png", "bbox": [1, 1, 2, 2], "instruction": "x"},
        {"id": "p2", "img_filename": "shot.png", "bbox": [1, 1, 2, 2], "instruction": "x", "application": "vscode"},
        {"id": "p3", "img_filename": "shot.png", "bbox": [1, 1, 2, 2]},
        {"id": "p4", "img_filename": "shot.png", "bbox": [1, 1, 2, 2], "instruction": "x", "ui_type": "text"},
    ]
    (pro / "annotations" / "vscode_macos.json").write_text(json.dumps(ann))
    samples, skipped = split(screenspot.loader("screenspot_pro")(pro / "annotations"))
    assert samples[0].meta["box"] == pytest.approx(want) and samples[0].meta["group"] == "Dev/icon"
    assert samples[1].meta["group"] == "vscode"  # no group nor ui_type: its application, not the text "None"
    assert samples[2].meta["group"] == "text"  # no group nor application: its ui_type alone
    copied = pickle.loads(pickle.dumps(screenspot.loader("screenspot_pro")))  # a closure did not pickle
    assert [x.meta for x in split(copied(pro / "annotations"))[0]] == [x.meta for x in samples]
    assert images_of(samples[0]) == [str(pro / "images" / "shot.png")]
    assert "not found" in skipped["p1"] and skipped["p3"] == "no instruction"
    # the convention is explicit and can be overridden
    [sample, *_], _ = split(
        screenspot.loader("screenspot_pro")(pro / "annotations" / "vscode_macos.json", box_format="xywh")
    )
    assert sample.meta["box"] == pytest.approx([0.2, 0.2, 0.7, 0.7])


def test_videomme_parquet_with_local_videos(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vidA.mp4").write_bytes(b"not decoded by the loader")
    rows = [
        {
            "question_id": "001-1",
            "videoID": "vidA",
            "duration": "short",
            "question": "What happens?",
            "options": ["A. x", "B. y", "C. z", "D. w"],
            "answer": "C",
        },
        {
            "question_id": "002-1",
            "videoID": "vidB",
            "duration": "long",
            "question": "?",
            "options": ["A. x", "B. y", "C. z", "D. w"],
            "answer": "A",
        },
        {
            "question_id": "003-1",
            "videoID": "vidA",
            "duration": "short",
            "question": "?",
            "options": ["x", "y", "z", "w"],
            "answer": "E",
        },
        {"question_id": "004-1", "videoID": "vidA", "question": "?", "options": ["x", "y", "z", "w"], "answer": "B"},
        {"question_id": "005-1", "videoID": None, "question": "?", "options": ["x", "y", "z", "w"], "answer": "B"},
    ]
    samples, skipped = split(videomme.load(write_parquet(tmp_path / "test.parquet", rows), max_frames=8))
    assert [s.index for s in samples] == ["001-1", "004-1"] and set(skipped) == {"002-1", "003-1", "005-1"}
    assert skipped["005-1"] == "no video"
    assert "?\nA. x\nB. y\nC. z\nD. w\n" in text_of(samples[1])  # bare options get their letters
    video = samples[0].messages[0]["content"][0]
    assert video == {"type": "video", "video": str(tmp_path / "data" / "vidA.mp4"), "fps": 1.0, "max_frames": 8}
    assert "\nC. z\n" in text_of(samples[0]) and samples[0].meta == {"answer": "C", "group": "short"}


def test_mmlongbench_pages_from_image_folder_and_tsv(tmp_path):
    doc = tmp_path / "documents" / "report"
    doc.mkdir(parents=True)
    for i in range(3):
        (doc / f"page_{i}.png").write_bytes(png())
    os.mkfifo(doc / "page_00.png")  # no page: reading it would wait for a writer for ever (the eval hung)
    rows = [
        {
            "doc_id": "report.pdf",
            "doc_type": "Research report",
            "question": "How many pages?",
            "answer": "3",
            "answer_format": "Int",
        },
        {"doc_id": "missing.pdf", "question": "?", "answer": "1", "answer_format": "Int"},
        {"doc_id": "report.pdf", "question": "?", "answer": "1", "answer_format": "Number"},
        {"doc_id": "report.pdf", "question": "?", "answer": None, "answer_format": "Str"},
    ]
    (tmp_path / "samples.json").write_text(json.dumps(rows))
    samples, skipped = split(mmlongbench.load(tmp_path / "samples.json", max_pages=2))
    assert len(samples) == 1 and set(skipped) == {1, 2, 3} and "answer_format" in skipped[2]
    assert skipped[3] == "no answer"
    assert images_of(samples[0]) == [str(doc / "page_0.png"), str(doc / "page_1.png")]
    assert samples[0].meta == {"format": "Int", "answer": "3", "group": "Research report"}
    assert "Not answerable" in text_of(samples[0])
    tsv = [
        {
            "index": "9",
            "doc_id": "x.pdf",
            "question": "?",
            "answer": "Not answerable",
            "answer_format": "None",
            "image": str([b64(png()), b64(png())]),
        }
    ]
    [sample], _ = split(mmlongbench.load(write_tsv(tmp_path / "MMLongBench_DOC.tsv", tsv)))
    assert len(images_of(sample)) == 2
    assert sample.meta == {"format": "None", "answer": "Not answerable", "group": ""}  # no doc_type


def test_mmlongbench_renders_pdf_pages(tmp_path):
    (tmp_path / "documents").mkdir()
    with pymupdf.open() as doc:
        for i in range(3):
            doc.new_page(width=300, height=200).insert_text((40, 100), f"Page {i + 1}", fontsize=20)
        doc.save(tmp_path / "documents" / "report.pdf")
    rows = [{"doc_id": "report.pdf", "question": "Pages?", "answer": "3", "answer_format": "Int"}]
    (tmp_path / "samples.json").write_text(json.dumps(rows))
    [sample], _ = split(mmlongbench.load(tmp_path / "samples.json", max_pages=2, dpi=144))
    pages = [Image.open(io.BytesIO(page)) for page in images_of(sample)]
    assert [page.size for page in pages] == [(600, 400)] * 2  # 300 x 200 pt at 144 dpi, the first 2 pages
    ink = [page.convert("L").point(lambda v: v < 128).getbbox() for page in pages]
    assert all(box is not None and box[0] >= 70 for box in ink)  # the text, from x = 40 pt = 80 px on


def _questions_on_one_pdf(tmp_path, monkeypatch, pages: int, questions: int) -> list[int]:
    """``samples.json`` of ``questions`` questions on ``documents/d.pdf`` of ``pages`` blank pages; returns the list
    that every page PyMuPDF loads from then on is appended to."""
    (tmp_path / "documents").mkdir()
    with pymupdf.open() as doc:
        for _ in range(pages):
            doc.new_page(width=100, height=100)
        doc.save(tmp_path / "documents" / "d.pdf")
    loaded, load_page = [], pymupdf.Document.load_page
    monkeypatch.setattr(pymupdf.Document, "load_page", lambda doc, i, *a: loaded.append(i) or load_page(doc, i, *a))
    rows = [{"doc_id": "d.pdf", "question": f"Q{i}?", "answer": "1", "answer_format": "Int"} for i in range(questions)]
    (tmp_path / "samples.json").write_text(json.dumps(rows))
    return loaded


def test_mmlongbench_loads_only_max_pages_and_renders_each_document_once(tmp_path, monkeypatch):
    """A long document loads only its first max_pages pages, and one render serves all of its questions."""
    loaded = _questions_on_one_pdf(tmp_path, monkeypatch, pages=40, questions=3)
    samples, skipped = split(mmlongbench.load(tmp_path / "samples.json", max_pages=2))
    assert not skipped and [len(images_of(s)) for s in samples] == [2, 2, 2]
    assert loaded == [0, 1]  # not all 40 pages, and not again for the second and third question


def test_rescoring_mmlongbench_renders_no_document(tmp_path, monkeypatch, capsys):
    """Re-scoring saved answers needs no pages, yet rendered every document (minutes for a benchmark's 135 PDFs)."""
    from kimivl.cli import main

    loaded = _questions_on_one_pdf(tmp_path, monkeypatch, pages=1, questions=2)
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"index": i, "prediction": "1"}) + "\n" for i in (0, 1)))
    argv = ["eval", "--task", "mmlongbench_doc", "--data", str(tmp_path / "samples.json")]
    assert main([*argv, "--predictions", str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "out")]) == 0
    assert loaded == [] and "scored 2 rows: 2 answered" in capsys.readouterr().out
    assert [len(images_of(s)) for s in split(mmlongbench.load(tmp_path / "samples.json"))[0]] == [1, 1]


def test_mmlongbench_renders_an_oversized_page_within_the_image_processors_pixel_cap(tmp_path):
    """A 14400 x 14400 pt page (207M pixels at 72 dpi) is rendered at the resolution that fits MAX_PIXELS (2^26)."""
    from kimivl.processing.image import MAX_PIXELS

    (tmp_path / "documents").mkdir()
    with pymupdf.open() as doc:
        doc.new_page(width=14400, height=14400)
        doc.new_page(width=300, height=200).insert_text((40, 100), "Page 2", fontsize=20)
        doc.save(tmp_path / "documents" / "poster.pdf")
        ordinary = doc[1].get_pixmap(dpi=72).tobytes("png")
    rows = [{"doc_id": "poster.pdf", "question": "Pages?", "answer": "2", "answer_format": "Int"}]
    (tmp_path / "samples.json").write_text(json.dumps(rows))
    [sample], _ = split(mmlongbench.load(tmp_path / "samples.json"))
    poster, page = images_of(sample)
    assert Image.open(io.BytesIO(poster)).size == (8192, 8192) and 8192 * 8192 <= MAX_PIXELS
    assert page == ordinary  # an ordinary page renders exactly as at the plain 72 dpi


def test_json_and_jsonl_tables_and_missing_data(tmp_path):
    """A JSON list, a JSON object holding its rows under 'data', JSONL (blank lines ignored): the same sample."""
    from kimivl.eval.tables import iter_rows

    row = {"index": "0", "image": b64(png()), "question": "What is written?", "answer": "['STOP']", "category": "x"}
    (tmp_path / "list.json").write_text(json.dumps([row]))
    (tmp_path / "object.json").write_text(json.dumps({"data": [row]}))
    (tmp_path / "rows.jsonl").write_text("\n" + json.dumps(row) + "\n\n")
    for name in ("list.json", "object.json", "rows.jsonl"):
        [sample], skipped = split(ocrbench.load(tmp_path / name))
        assert not skipped and sample.meta["answers"] == ["STOP"] and text_of(sample) == "What is written?"
    (tmp_path / "scalar.json").write_text(json.dumps({"data": 3}))
    with pytest.raises(ValueError, match="scalar.json: expected a JSON list of rows"):
        list(iter_rows(tmp_path / "scalar.json"))
    with pytest.raises(FileNotFoundError, match="benchmark data not found: .*nowhere"):
        list(iter_rows(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no tables here")
    with pytest.raises(FileNotFoundError, match="no .tsv, .parquet, .json, .jsonl files under"):
        list(iter_rows(tmp_path / "empty"))


def test_jsonl_tables_split_only_at_newlines_skip_a_bom_and_name_a_bad_line(tmp_path):
    from kimivl.eval.tables import iter_rows

    row = {"index": "0", "image": b64(png()), "question": "What is\u2028written?", "answer": "['ST\u2029OP']"}
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\r\n")
    [sample], skipped = split(ocrbench.load(path))
    assert not skipped and sample.meta["answers"] == ["ST\u2029OP"] and text_of(sample) == "What is\u2028written?"
    path.write_text(json.dumps(row) + "\n" + '{"index": "1", "question"\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: invalid JSON"):
        list(iter_rows(path))


def test_a_tsv_saved_with_a_bom_keeps_its_index_column_and_one_not_utf8_names_the_line(tmp_path):
    """Excel and Notepad put a byte-order mark first: read into the header it renamed 'index' to '\\ufeffindex', so the
    rows fell back to their positions and matched no prediction. A Latin-1 byte is a DataError naming file and line."""
    rows = [
        {"index": str(100 + i), "image": b64(png()), "question": f"Word {i}?", "answer": f"['w{i}']", "category": "c"}
        for i in range(3)
    ]
    path = write_tsv(tmp_path / "OCRBench.tsv", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    samples, skipped = split(ocrbench.load(path))
    assert [s.index for s in samples] == [100, 101, 102] and not skipped
    path.write_bytes(path.read_bytes()[3:].replace(b"Word 1?", "W\xf6rd 1?".encode("latin-1")))
    with pytest.raises(DataError, match=r"OCRBench.tsv:3: not UTF-8 \(byte [0-9]+ of the line\)"):
        list(ocrbench.load(path))
    (tmp_path / "mine.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"index": 1, "prediction": "w1"}\n')
    assert table_files(tmp_path) == [path]  # a predictions file with a BOM is no data either


def test_a_small_base64_image_is_an_image_not_a_file_name(tmp_path):
    from kimivl.eval.tables import RowError, image_bytes

    buf = io.BytesIO()
    Image.frombytes("RGB", (10, 8), random.Random(0).randbytes(240)).save(buf, format="PNG")  # noise: no compression
    small = buf.getvalue()
    cell = b64(small)
    assert 256 < len(cell) < 1024  # longer than a file name may be: a path check alone fails with ENAMETOOLONG
    assert image_bytes(cell, tmp_path) == small
    tiny = png(1, 1)
    assert image_bytes(b64(tiny), tmp_path) == tiny  # under 100 characters
    with pytest.raises(RowError, match="not a readable image"):
        image_bytes(b64(b"%PDF-1.4 not an image at all" * 4), tmp_path)
    (tmp_path / "pic.png").write_bytes(small)
    assert image_bytes("pic.png", tmp_path) == str(tmp_path / "pic.png")
    for empty in ("", None, 0, 7):
        with pytest.raises(RowError, match="^no image$"):
            image_bytes(empty, tmp_path)
    # up to 64 characters (an index another row's image goes by) a cell that is no file is named as such
    with pytest.raises(RowError, match="neither a file under .* nor the index of a row"):
        image_bytes("x" * 64, tmp_path)
    with pytest.raises(RowError, match="neither base64 nor a file"):
        image_bytes("x" * 64 + "!", tmp_path)
    rows = [
        {"index": "0", "image": cell, "question": "Word?", "answer": "['a']", "category": "c"},
        {"index": "1", "image": b64(b"GIF89a-broken" * 30), "question": "Word?", "answer": "['b']", "category": "c"},
    ]
    samples, skipped = split(ocrbench.load(write_tsv(tmp_path / "OCRBench.tsv", rows)))
    assert [s.index for s in samples] == [0] and images_of(samples[0]) == [small]
    assert "not a readable image" in skipped[1]


def test_prediction_files_inside_the_data_directory_are_not_rows(tmp_path):
    rows = [
        {"index": str(i), "image": b64(png()), "question": f"Word {i}?", "answer": f"['w{i}']", "category": "c"}
        for i in range(3)
    ]
    write_tsv(tmp_path / "OCRBench.tsv", rows)
    (tmp_path / "ocrbench.predictions.jsonl").write_text('{"index": 0, "prediction": "w0"}\n')
    (tmp_path / "mine.jsonl").write_text('{"index": 1, "prediction": "w1", "extracted": "w1"}\n')
    (tmp_path / "ocrbench.scored.jsonl").write_text('{"index": "0", "score": 1.0}\n')
    (tmp_path / "results.json").write_text('{"ocrbench": {"metrics": {}}}\n')
    samples, skipped = split(ocrbench.load(tmp_path))
    assert [s.index for s in samples] == [0, 1, 2] and not skipped


def test_ocrbench_own_json_layout(tmp_path):
    root = tmp_path / "OCRBench"
    (root / "OCRBench").mkdir(parents=True)
    (root / "OCRBench_Images" / "IIIT5K").mkdir(parents=True)
    (root / "OCRBench_Images" / "IIIT5K" / "1.png").write_bytes(png())
    (root / "OCRBench_Images" / "HME").mkdir()
    (root / "OCRBench_Images" / "HME" / "2.png").write_bytes(png())
    rows = [
        {
            "dataset_name": "IIIT5K",
            "id": 7,
            "image_path": "IIIT5K/1.png",
            "question": "what is written?",
            "answers": "CENTRE",
            "type": "Regular Text Recognition",
        },
        {
            "dataset_name": "HME100k",
            "id": 7,
            "image_path": "HME/2.png",
            "question": "latex?",
            "answers": ["x ^ { 2 }"],
            "type": "Handwritten Mathematical Expression Recognition",
        },
        {
            "dataset_name": "svt",
            "id": 9,
            "image_path": "svt/missing.png",
            "question": "q",
            "answers": "A",
            "type": "Regular Text Recognition",
        },
        {  # the released row: a string that looks like a list is still one answer
            "dataset_name": "HME100k",
            "id": 20952,
            "image_path": "HME/2.png",
            "question": "latex?",
            "answers": "[ \\arccos \\frac { 1 } { 4 } , \\pi ]\n",
            "type": "Handwritten Mathematical Expression Recognition",
        },
    ]
    data = root / "OCRBench" / "OCRBench.json"
    data.write_text(json.dumps(rows))
    samples, skipped = split(ocrbench.load(data))
    assert [s.index for s in samples] == [0, 1, 3] and "not found" in skipped[2]
    first, hme, listlike = samples
    assert listlike.meta["answers"] == [rows[3]["answers"]] and listlike.meta["hme"]
    assert ocrbench.score("$[\\arccos\\frac{1}{4},\\pi]$", listlike.meta)["score"] == 1.0
    assert images_of(first) == [str(root / "OCRBench_Images" / "IIIT5K" / "1.png")]
    assert first.meta == {"answers": ["CENTRE"], "hme": False, "group": "Regular Text Recognition"}
    assert hme.meta["hme"] and hme.meta["answers"] == ["x ^ { 2 }"]
    assert ocrbench.score("x^{2}", hme.meta)["score"] == 1.0 and ocrbench.score("X^{2}", hme.meta)["score"] == 0.0


def test_deeply_nested_json_is_a_data_error_naming_the_file(tmp_path, capsys):
    from kimivl.cli import main

    pred = tmp_path / "p.jsonl"
    pred.write_text('{"index": 0, "prediction": "x"}\n')
    for name in ("deep.jsonl", "deep.json"):
        data = tmp_path / name.split(".")[1]
        data.mkdir()
        (data / name).write_text("[" * 100_000)
        with pytest.raises(ValueError, match=rf"{name}(:1)?: JSON nested too deeply to read"):
            list(ocrbench.load(data))
        args = ["--task", "ocrbench", "--data", str(data), "--predictions", str(pred)]
        assert main(["eval", *args, "--out", str(tmp_path / "runs" / "eval")]) == 2
        err = capsys.readouterr().err
        assert f"{data / name}" in err and "nested too deeply" in err and "Traceback" not in err
        assert not (tmp_path / "runs").exists()  # the failed start left no output directory, nor its parent
    broken = tmp_path / "broken.json"
    broken.write_text('[{"index": 0,')
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON \(Expecting property name"):
        list(ocrbench.load(broken))


def test_mmmu_hub_directory_scores_the_validation_rows_and_their_official_random_stream(tmp_path):
    """The hub's MMMU has no split column: dev, validation and test rows sit in files named after their split, with
    ids dev_Art_1, validation_Art_1, test_Art_1. Only the validation rows are read, so MMMU's random stream (seed 42,
    subjects in the official order) is drawn for them alone, as the official script draws it."""

    def row(split_name, subject, i):
        return {
            "id": f"{split_name}_{subject}_{i}",
            "question": "Which?",
            "options": "['p', 'q', 'r', 's']",
            "answer": "A",  # the hub's test rows have "?"; labelled here, they must still be left out
            "question_type": "multiple-choice",
            "image_1": {"bytes": png(), "path": None},
        }

    for subject in ("Math", "Art"):
        (tmp_path / subject).mkdir()
        for name in ("dev", "validation", "test"):
            rows = [row(name, subject, i) for i in (1, 2, 3)]
            write_parquet(tmp_path / subject / f"{name}-00000-of-00001.parquet", rows)
    samples, skipped = split(mmmu.load(tmp_path))
    assert not skipped
    assert [s.index for s in samples] == [f"validation_{s}_{i}" for s in ("Art", "Math") for i in (1, 2, 3)]
    scored = mmmu.score_rows([("I cannot tell.", s.meta, None) for s in samples])
    rng = random.Random(42)  # the official script: Art's rows, then Math's (CAT_SHORT2LONG order), one stream
    assert [r["extracted"] for r in scored] == [rng.choice("ABCD") for _ in samples]
    assert all(r["random"] for r in scored)


def test_mmmu_split_from_the_id_or_the_file_name_and_rows_of_no_split_are_read(tmp_path):
    base = {"question": "Which?", "options": "['p', 'q']", "answer": "B", "image_1": {"bytes": png(), "path": None}}
    write_parquet(tmp_path / "dev-00000.parquet", [{**base, "id": "7"}])  # no prefix: the file name tells
    write_parquet(tmp_path / "mine.parquet", [{**base, "id": "8"}, {**base, "id": "test_Art_1"}])
    samples, _ = split(mmmu.load(tmp_path))
    assert [s.index for s in samples] == [8]  # of a split not named anywhere: read


def test_rows_that_break_a_loader_with_arithmetic_are_skipped_with_the_reason(tmp_path):
    """img_size [0, 0] with a pixel box (a division by zero), a precision of "inf" (int() overflows): each such row
    is skipped, naming what is wrong; the good rows are read."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png(200, 100))
    good = {"img_filename": "a.png", "instruction": "click ok", "bbox": [10, 10, 50, 40], "img_size": [200, 100]}
    ann = [
        {**good, "id": "ok"},
        {**good, "id": "zero", "img_size": [0, 0]},
        {**good, "id": "one", "img_size": [200]},
        {**good, "id": "neg", "img_size": "[-200, 100]"},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    samples, skipped = split(screenspot.loader("screenspot_pro")(tmp_path / "ann.json"))
    assert [s.index for s in samples] == ["ok"] and samples[0].meta["box"] == pytest.approx([0.05, 0.1, 0.25, 0.4])
    assert skipped == {
        "zero": "img_size must be [width, height] of positive pixels, got [0, 0]",
        "one": "img_size must be [width, height] of positive pixels, got [200]",
        "neg": "img_size must be [width, height] of positive pixels, got '[-200, 100]'",
    }

    row = {"question": "q", "image": b64(png()), "question_type": "free_form", "answer_type": "float", "answer": "1.5"}
    rows = [{**row, "pid": str(i), "precision": p} for i, p in enumerate([1, "inf", "nan", -1, 1.5, "two"])]
    (tmp_path / "mv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, skipped = split(mathvista.load(tmp_path / "mv.jsonl"))
    assert [(s.index, s.meta["precision"]) for s in samples] == [(0, 1)]
    for i, p in zip(range(1, 5), ["'inf'", "'nan'", "-1", "1.5"]):
        assert skipped[i] == f"precision must be a whole number of decimal places, got {p}"
    assert skipped[5] == "ValueError: could not convert string to float: 'two'"


def test_load_samples_skips_rows_raising_arithmetic_or_lookup_errors_naming_them(tmp_path):
    from kimivl.eval.tables import load_samples

    def parse(row, index, file):
        return Sample(index, [], {"ratio": 1 / row["n"], "first": [0][row["i"]], "big": int(float(row["x"]))})

    rows = [{"n": 1, "i": 0, "x": "1"}, {"n": 0, "i": 0, "x": "1"}, {"n": 1, "i": 3, "x": "1"}, {"n": 1, "i": 0}]
    rows.append({"n": 1, "i": 0, "x": "inf"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, skipped = split(load_samples(tmp_path / "t.jsonl", parse))
    assert [s.index for s in samples] == [0]
    assert skipped == {
        1: "ZeroDivisionError: division by zero",
        2: "IndexError: list index out of range",
        3: "KeyError: missing column 'x'",
        4: "OverflowError: cannot convert float infinity to integer",
    }


def test_an_unreadable_pdf_skips_its_rows_with_the_reason(tmp_path):
    (tmp_path / "documents").mkdir()
    with pymupdf.open() as doc:
        doc.new_page(width=300, height=200)
        doc.save(tmp_path / "documents" / "good.pdf")
    (tmp_path / "documents" / "corrupt.pdf").write_bytes(b"%PDF-1.4 not really a pdf")
    row = {"question": "Pages?", "answer": "1", "answer_format": "Int"}
    rows = [{**row, "index": 0, "doc_id": "good.pdf"}, {**row, "index": 1, "doc_id": "corrupt.pdf"}]
    (tmp_path / "samples.json").write_text(json.dumps(rows))
    samples, skipped = split(mmlongbench.load(tmp_path / "samples.json"))
    assert [s.index for s in samples] == [0] and len(images_of(samples[0])) == 1
    assert list(skipped) == [1]
    assert skipped[1].startswith(f"unreadable document {tmp_path / 'documents' / 'corrupt.pdf'}: Failed to open")


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_a_row_without_an_answer_or_a_question_is_skipped_not_prompted_with_none(tmp_path, empty):
    mv = {"pid": "1", "question": "How many?", "image": b64(png()), "question_type": "free_form"}
    mv = {**mv, "answer_type": "integer", "answer": "3"}
    mv_rows = [mv, {**mv, "pid": "2", "answer": empty}, {**mv, "pid": "3", "question": empty}]
    (tmp_path / "mv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mv_rows))
    samples, skipped = split(mathvista.load(tmp_path / "mv.jsonl"))
    assert [s.index for s in samples] == [1] and skipped == {2: "no answer", 3: "no question"}
    # a query (the hub's full prompt) stands in for the question
    (tmp_path / "mvq.jsonl").write_text(json.dumps({**mv, "question": empty, "query": "Hint: count\nQ?"}) + "\n")
    [sample], _ = split(mathvista.load(tmp_path / "mvq.jsonl"))
    assert text_of(sample) == "Hint: count\nQ?"

    mm = {"id": "validation_Art_1", "options": "['p', 'q']", "answer": "A", "image_1": {"bytes": png(), "path": None}}
    write_parquet(tmp_path / "validation.parquet", [{**mm, "question": "Which?"}, {**mm, "id": "validation_Art_2"}])
    samples, skipped = split(mmmu.load(tmp_path / "validation.parquet"))
    assert [s.index for s in samples] == ["validation_Art_1"] and skipped == {"validation_Art_2": "no question"}

    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "d").mkdir()
    (tmp_path / "documents" / "d" / "p1.png").write_bytes(png())
    doc = [{"index": 0, "doc_id": "d.pdf", "question": empty, "answer": "1", "answer_format": "Int"}]
    (tmp_path / "samples.json").write_text(json.dumps(doc))
    assert split(mmlongbench.load(tmp_path / "samples.json"))[1] == {0: "no question"}

    ocr = {"index": "0", "image": b64(png()), "question": empty, "answer": "['STOP']"}
    assert split(ocrbench.load(write_tsv(tmp_path / "ocr.tsv", [ocr])))[1] == {0: "no question"}


def test_a_64_character_row_index_still_names_a_shared_image(tmp_path):
    """A cell of up to 64 characters naming another row's index takes that row's image: a sha256 hex digest (64
    characters) as the index included."""
    red = png()
    key = hashlib.sha256(b"row 0").hexdigest()
    rows = [
        {"index": key, "question": "Q1", "A": "x", "B": "y", "answer": "A", "image": b64(red)},
        {"index": "7", "question": "Q2", "A": "x", "B": "y", "answer": "B", "image": key},
    ]
    samples, skipped = split(mmmu.load(write_tsv(tmp_path / "t.tsv", rows)))
    assert not skipped and [s.index for s in samples] == [key, 7] and images_of(samples[1]) == [red]


def test_benchmark_rows_with_a_prediction_column_are_data_not_eval_output(tmp_path):
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": "q", "prediction": "p", "answer": "a"}) + "\n")
    (tmp_path / "run.jsonl").write_text(json.dumps({"index": 0, "prediction": "p"}) + "\n")
    assert table_files(tmp_path) == [tmp_path / "bench.jsonl"]


def test_an_empty_list_cell_is_an_empty_list():
    """A null, NaN or blank cell holds no items (not one item "None"); a lone value is a list of one."""
    assert [literal_list(v) for v in (None, "", float("nan"))] == [[], [], []]
    assert literal_list("x") == ["x"] and literal_list(" [1, 'a']") == [1, "a"] and literal_list((3,)) == [3]
    for deep in ("[" + "1+" * 100_000 + "1]", "[" + "-" * 100_000 + "1]"):  # a RecursionError, a MemoryError escaped
        with pytest.raises(RowError, match="cannot read .* as a list"):  # the row is skipped, the run goes on
            literal_list(deep)


def test_json_rows_under_samples_or_annotations_and_a_struct_with_only_a_path(tmp_path):
    for key in ("data", "samples", "annotations"):
        (tmp_path / f"{key}.json").write_text(json.dumps({key: [{"index": key}]}))
        assert [row for _, row in iter_rows(tmp_path / f"{key}.json")] == [{"index": key}]
    (tmp_path / "a.png").write_bytes(png())
    assert image_bytes({"bytes": None, "path": "a.png"}, tmp_path) == str(tmp_path / "a.png")  # a hub struct
