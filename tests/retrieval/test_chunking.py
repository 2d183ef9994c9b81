"""Chunking: sentence boundaries, token budget, and the image names that travel with each <PIC>."""

import pytest

from m2io_jax.data import mramg
from m2io_jax.data.demo import demo_root
from m2io_jax.retrieval import chunking


def _doc(content, images):
    return mramg.Document("7", content, tuple(images), "x")


def test_images_follow_their_markers_across_chunks():
    content = " ".join(
        f"Sentence number {i} is here.<PIC>" if i % 3 == 0 else f"Sentence number {i} is here." for i in range(30)
    )
    images = [f"im{i}" for i in range(0, 30, 3)]
    chunks = chunking.chunk_document(_doc(content, images), max_tokens=40)
    assert len(chunks) > 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [i for c in chunks for i in c.images] == images
    for c in chunks:
        assert c.text.count("<PIC>") == len(c.images)
        assert chunking.estimate_tokens(c.text) <= 40
        assert c.text.endswith(".") or c.text.endswith("<PIC>")  # cut at sentence ends
        assert "<PIC>" not in c.plain_text


def test_length_fn_is_used():
    content = "One two three. Four five six. Seven eight nine."
    words = lambda t: len(t.split())  # noqa: E731
    assert [c.text for c in chunking.chunk_document(_doc(content, []), max_tokens=8, length_fn=words)] == [
        "One two three. Four five six.", "Seven eight nine."]


def test_long_sentence_is_cut_and_keeps_its_image():
    content = " ".join(["word"] * 50) + ".<PIC> Short one."
    chunks = chunking.chunk_document(_doc(content, ["a"]), max_tokens=10)
    assert all(chunking.estimate_tokens(c.text) <= 10 for c in chunks)
    assert [i for c in chunks for i in c.images] == ["a"]


def test_extra_markers_dropped_and_leading_image_kept():
    chunks = chunking.chunk_document(_doc("<PIC> Title. Body.<PIC><PIC>", ["a", "b"]), max_tokens=64)
    assert [c.text for c in chunks] == ["<PIC> Title. Body.<PIC>"]
    assert chunks[0].images == ("a", "b")


@pytest.mark.parametrize("name", ["demo_web", "demo_recipe", "demo_manual"])
def test_demo_chunks_cover_every_image(name):
    ds = mramg.load_dataset(demo_root(), name)
    chunks = chunking.chunk_documents(ds.documents.values(), max_tokens=256)
    assert sorted(i for c in chunks for i in c.images) == sorted(i for d in ds.documents.values() for i in d.images)
