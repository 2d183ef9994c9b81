"""One small real setup shared by the pipeline, task and evaluation tests: demo_manual, a tiny Qwen2.5-VL built
from its text, its processor and a MiniLM + ScaNN retriever, built once per test process."""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import ml_collections

from m2io_jax import train_config
from m2io_jax.inserter import pipeline, sources
from m2io_jax.models import sentence_encoder, tiny
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

DATASET = "demo_manual"
QUESTIONS = {"train": 48, "validation": 12, "test": 12}  # demo_manual under the default split rule


@dataclasses.dataclass(frozen=True)
class DemoSetup:
    config: ml_collections.ConfigDict  # train config: demo_manual, top 3 chunks, at most 6 candidates
    dataset: sources.SplitDataset
    checkpoint: str
    processor: Qwen2_5_VLProcessor
    retriever: object

    def examples(self, split: str, **pipeline_overrides) -> tuple[list[pipeline.PromptExample], dict[str, int]]:
        settings = ml_collections.ConfigDict(self.config.pipeline.to_dict())
        settings.update(pipeline_overrides)
        found, counts = pipeline.build_examples(
            self.dataset, split, retriever=self.retriever, processor=self.processor, data=self.config.data,
            inserter=self.config.inserter, pipeline=settings)
        return found, dict(counts)


@functools.cache
def demo_setup() -> DemoSetup:
    config = train_config.get_config()
    config.data.datasets = (DATASET,)
    config.data.retrieval.top_k = 3
    config.data.candidates.max_images = 6
    config.pipeline.max_prompt_tokens = 4096
    directory = tempfile.mkdtemp(prefix="m2io_demo_setup_")
    (dataset,) = sources.load_datasets(config.data, image_dir=directory)
    texts = pipeline.tokenizer_texts([dataset], config.inserter, max_images=config.data.candidates.max_images)
    checkpoint = tiny.build_tiny_checkpoint(f"{directory}/tiny", texts, kind="qwen2_5_vl",
                                            vocab_size=config.model.tiny.vocab_size)
    processor = Qwen2_5_VLProcessor.from_pretrained(checkpoint)
    encoder = sentence_encoder.load_encoder(config.data.retrieval.encoder_path)
    retriever = pipeline.build_retrievers([dataset], config.data, encoder)[DATASET]
    return DemoSetup(config, dataset, checkpoint, processor, retriever)
