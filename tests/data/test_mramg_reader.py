"""MRAMG reader: official layouts, id normalisation, marker detection, gold anchors, and every bad-input path."""

import json
import os

import pytest

from m2io_jax.data import mramg


@pytest.mark.parametrize("image_layout", ["IMAGE/IMAGE", "IMAGE", ""])
@pytest.mark.parametrize("object_docs", [False, True])
def test_reads_official_layouts(tmp_path, make_mramg, image_layout, object_docs):
    root = make_mramg(str(tmp_path), image_layout=image_layout, object_docs=object_docs)
    ds = mramg.load_dataset(root, "wit", strict=True)
    assert set(ds.documents) == {"1", "2"}  # ints on disk -> str
    doc = ds.documents["1"]
    assert doc.images == ("wit_a", "wit_b") and doc.dataset == "wit"
    assert [q.id for q in ds.questions] == ["q1", "q2", "q3", "q4"]
    assert ds.questions[0].provenance == ("1",)
    info = ds.images["wit_c"]
    assert info.caption == "caption of wit_c"
    assert os.path.isabs(info.path) and os.path.isfile(info.path)
    assert ds.report.problems == [] and ds.report.num_images == 3


def test_marker_form_and_anchors(mramg_root):
    ds = mramg.load_dataset(mramg_root, "wit")
    assert ds.report.answer_marker_form == mramg.FORM_PIC
    assert ds.report.marker_forms == {"no_images": 1, "pic": 3}
    q4 = ds.questions[3]
    assert q4.answer == "A red kite. An old tree."
    assert [(a.image, a.sentence_index, a.sentence) for a in q4.anchors] == [
        ("wit_a", 0, "A red kite."), ("wit_b", 1, "An old tree.")]
    assert ds.questions[2].marker_form == mramg.FORM_NO_IMAGES and ds.questions[2].anchors == ()


@pytest.mark.parametrize(
    "ground_truth, form, anchors",
    [
        ("First.<img1> Second.<img2>", mramg.FORM_IMG, [("a", 0), ("b", 1)]),
        ("Mid <PIC>sentence. Next.", mramg.FORM_PIC, [("a", 0)]),
        ("Intro. See photo_a.jpg here. Then more.", mramg.FORM_NAME, [("photo_a", 1)]),
        ("No markers at all.", mramg.FORM_NONE, []),
        ("Stray marker.<PIC> Text.", mramg.FORM_NO_IMAGES, []),
        ("<PIC> Leading image. Then text.<PIC>", mramg.FORM_PIC, [("a", -1), ("b", 1)]),
    ],
)
def test_detects_each_marker_form(ground_truth, form, anchors):
    images = {mramg.FORM_NAME: ("photo_a", "photo_b"), mramg.FORM_NO_IMAGES: ()}.get(form, ("a", "b"))
    q = mramg._with_anchors(
        mramg.Question("q", "?", ("1",), ground_truth, images, "x"), "f", 1,
        mramg._Problems(mramg.LoadReport("x"), strict=False))
    assert q.marker_form == form
    assert [(a.image, a.sentence_index) for a in q.anchors] == anchors
    assert "<PIC>" not in q.answer and "<img" not in q.answer


def test_malformed_line_skipped_and_reported(tmp_path, make_mramg):
    root = make_mramg(str(tmp_path), doc_lines_extra=('[3, "broken', '{"id": 4}', '[5, "ok<PIC>", ["wit_a"]]'))
    ds = mramg.load_dataset(root, "wit")
    assert "5" in ds.documents and "3" not in ds.documents
    assert ds.report.skipped_lines == 2
    kinds = [(p.kind, p.line) for p in ds.report.problems]
    assert ("malformed_json", 3) in kinds and ("bad_document", 4) in kinds
    doc_file = os.path.join(root, "doc_wit.jsonl")
    assert any(str(p).startswith(f"{doc_file}:3: [malformed_json]") for p in ds.report.problems)
    assert "2 malformed lines skipped" in ds.report.summary()


def test_strict_raises_with_file_and_line(tmp_path, make_mramg):
    root = make_mramg(str(tmp_path), doc_lines_extra=("not json",))
    with pytest.raises(mramg.MramgFormatError, match=r"doc_wit\.jsonl:3: \[malformed_json\]"):
        mramg.load_dataset(root, "wit", strict=True)


def test_missing_and_unreadable_images_named(tmp_path, make_mramg):
    root = make_mramg(str(tmp_path))
    image_dir = os.path.join(root, "IMAGE", "IMAGE", "images", "WIT")
    os.remove(os.path.join(image_dir, "wit_b.jpg"))
    with open(os.path.join(image_dir, "wit_c.jpg"), "wb") as f:
        f.write(b"not an image")
    ds = mramg.load_dataset(root, "wit")
    by_kind = {p.kind: p for p in ds.report.problems}
    assert "'wit_b.jpg'" in by_kind["missing_image"].message
    info = os.path.join(root, "IMAGE", "IMAGE", "images_info", "wit_imgs_collection.json")
    wit_b_line = next(i for i, line in enumerate(open(info), start=1) if line.strip().startswith('"wit_b"'))
    assert str(by_kind["missing_image"]).startswith(f"{info}:{wit_b_line}: [missing_image]")
    assert by_kind["unreadable_image"].file == os.path.join(image_dir, "wit_c.jpg")
    assert ds.images["wit_b"].path == ""
    with pytest.raises(mramg.MramgFormatError, match="wit_b.jpg"):
        mramg.load_dataset(root, "wit", strict=True)


def test_pic_count_mismatch_reported(tmp_path, make_mramg):
    docs = [[1, "One.<PIC> Two.<PIC>", ["wit_a"]], [2, "None here.", ["wit_c"]]]
    root = make_mramg(str(tmp_path), docs=docs, questions=[])
    ds = mramg.load_dataset(root, "wit")
    mismatches = [p for p in ds.report.problems if p.kind == "pic_count_mismatch"]
    assert [(p.line, p.message) for p in mismatches] == [
        (1, "document 1: 2 <PIC> markers but 1 entries in images_list"),
        (2, "document 2: 0 <PIC> markers but 1 entries in images_list")]
    assert set(ds.documents) == {"1", "2"}  # reported, not dropped


def test_dangling_references_and_duplicates(tmp_path, make_mramg):
    questions = [
        {"id": 7, "question": "?", "provenance": [9], "ground_truth": "x.<PIC>", "images_list": ["nope"]},
        {"id": 7, "question": "?", "provenance": [1], "ground_truth": "y", "images_list": []},
        {"question": "no id"},
    ]
    root = make_mramg(str(tmp_path), questions=questions)
    ds = mramg.load_dataset(root, "wit")
    assert [q.id for q in ds.questions] == ["7"]
    kinds = sorted((p.kind, p.line) for p in ds.report.problems)
    assert kinds == [("bad_question", 3), ("duplicate_id", 2), ("unknown_document", 1), ("unknown_image", 1)]


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"doc_wit\.jsonl"):
        mramg.load_dataset(str(tmp_path), "wit")


def test_images_info_malformed(tmp_path, make_mramg):
    root = make_mramg(str(tmp_path))
    info = os.path.join(root, "IMAGE", "IMAGE", "images_info", "wit_imgs_collection.json")
    with open(info, "w") as f:
        f.write('{"wit_a": {"image_caption": 1, "image_path": "wit_a.jpg"}, "wit_b": 3}')
    ds = mramg.load_dataset(root, "wit")
    messages = [(p.line, p.message) for p in ds.report.problems if p.file == info]
    assert (1, "image 'wit_a': missing or non-string 'image_caption'") in messages
    assert (1, "image 'wit_b': expected an object, found 3") in messages
    assert any(p.kind == "unknown_image" and "wit_c" in p.message for p in ds.report.problems)
    json.loads(open(info).read())  # the fixture itself is valid JSON: problems come from content, not syntax
