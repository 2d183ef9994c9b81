"""The end-to-end systems on the demo_manual setup (tiny inserter, tiny generator, MiniLM + ScaNN): oracle-text
prompts are the trainer's validation prompts, what a completion says is what the answer shows (both output
formats), the rule threshold's two sources, no placeholder without candidates, and the errors that say what to
run."""

import dataclasses
import json
import os

import pytest

from m2io_jax import cli, generator, systems, train_config
from m2io_jax.data import mramg
from m2io_jax.eval import metrics
from m2io_jax.inserter import evaluation, formats
from m2io_jax.inserter.sources import SplitDataset
from m2io_jax.inserter.task import decode_completion
from m2io_jax.models import tiny
from tests.inserter.demo_setup import DATASET, demo_setup


@pytest.fixture(scope="module")
def setup():
    return demo_setup()


@pytest.fixture(scope="module")
def workdir(setup, tmp_path_factory):
    """A run directory holding the demo setup's inserter as final/ and sft/ and a tiny text generator."""
    path = tmp_path_factory.mktemp("run")
    for name in ("final", "sft"):
        os.symlink(setup.checkpoint, path / name)
    texts = [q.question for q in setup.dataset.questions] + [d.content for d in setup.dataset.documents.values()]
    tiny.build_tiny_checkpoint(path / "generator", texts, kind="qwen2", vocab_size=600)
    return str(path)


def _run_dir(tmp_path, workdir):
    """A new run directory whose checkpoints are the module run's (final, sft, both generators)."""
    run = tmp_path / "run"
    os.makedirs(run)
    for name in ("final", "sft", "generator"):
        os.symlink(os.path.join(workdir, name), run / name)
    os.symlink(os.path.join(workdir, "generator"), run / "generator_llm")
    with open(run / "eval.json", "w") as f:
        json.dump({"rule": {"threshold": 0.3}}, f)
    return str(run)


def _config(setup, output_format="anchors"):
    config = train_config.get_config()
    config.systems = systems.get_systems_config()
    for section in ("data", "inserter", "pipeline"):
        config[section] = setup.config[section]
    config.inserter = setup.config.inserter.copy_and_resolve_references()
    config.inserter.output_format = output_format
    config.eval.batch_size = 4
    config.eval.max_new_tokens = 16
    config.systems.batch_size = 5
    config.systems.generator.max_new_tokens = 12
    return config


def _encoder(setup):
    return setup.retriever.encoder


def _gold_completions(tokenizer, inserter):
    """A stand-in for the greedy decode: each prompt's gold placements rendered as its completion."""
    def completions(model, examples, **kwargs):
        out = []
        for e in examples:
            placements = e.example.gold_anchors or ()
            text = formats.render_completion(e.example.answer, placements, output_format=inserter.output_format)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [kwargs["stop_tokens"][0]])
        return out
    return completions


def test_oracle_text_prompts_are_the_trainers_validation_prompts(setup, workdir):
    config = _config(setup)
    retrieval = systems.build_retrieval(config, workdir, setup.dataset, _encoder(setup))
    inserter = systems.ModelInserter(setup.checkpoint, config, retrieval)
    questions = setup.dataset.questions_of("validation")
    prompts = inserter.prompts(questions, retrieval(questions), answers=None)
    trained, _ = setup.examples("validation")
    by_id = {e.example.candidates.question_id: e for e in trained}
    assert len(by_id) == len(questions)
    for question, prompt in zip(questions, prompts):
        expected = by_id[question.id]
        if not expected.example.candidate_ids:
            assert prompt is None
            continue
        assert prompt.prompt_ids == expected.prompt_ids
        assert prompt.example == expected.example


def test_oracle_text_greedy_answers_match_the_trainers_evaluation(setup, workdir):
    config = _config(setup)
    system = systems.build_system("oracle-text", config, workdir, dataset=setup.dataset, encoder=_encoder(setup))
    questions = setup.dataset.questions_of("validation")[:4]
    answers = system.answer(questions)
    trained, _ = setup.examples("validation")
    by_id = {e.example.candidates.question_id: e for e in trained}
    examples = [by_id[q.id] for q in questions]
    inserter = systems.ModelInserter(setup.checkpoint, config,
                                     systems.build_retrieval(config, workdir, setup.dataset, _encoder(setup)))
    completions = evaluation.greedy_completions(
        inserter.model, examples, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
        stop_tokens=inserter.stop_tokens, suppress_tokens=inserter.suppress_tokens)
    for answer, example, ids in zip(answers, examples, completions):
        parsed = formats.parse_completion(
            decode_completion(inserter.processor.tokenizer, ids, inserter.stop_tokens), output_format="anchors",
            think=False, answer=example.example.answer, candidate_ids=example.example.candidate_ids)
        assert metrics.image_markers(answer.text) == parsed.images
        assert answer.tokens["insert"] == systems.completion_length(ids, inserter.stop_tokens)
        assert answer.image_map == example.example.candidates.image_map


@pytest.mark.parametrize("output_format", formats.FORMATS)
def test_oracle_text_answer_shows_the_placements_the_completion_states(setup, workdir, monkeypatch, output_format):
    config = _config(setup, output_format)
    tokenizer = setup.processor.tokenizer
    monkeypatch.setattr(evaluation, "greedy_completions", _gold_completions(tokenizer, config.inserter))
    system = systems.build_system("oracle-text", config, workdir, dataset=setup.dataset, encoder=_encoder(setup))
    questions = [q for q in setup.dataset.questions_of("validation") if q.images]
    answers = system.answer(questions)
    assert [a.question_id for a in answers] == [q.id for q in questions]
    placed = 0
    for question, answer in zip(questions, answers):
        tags = {name: tag for tag, name in answer.image_map.items()}
        gold = {}
        for anchor in question.anchors:
            if anchor.image in tags:
                gold.setdefault(anchor.image, formats.Placement(tags[anchor.image], anchor.sentence_index))
        assert answer.text == formats.assemble_inline(question.answer, list(gold.values()))
        assert answer.images == list(dict.fromkeys(
            name for name in question.images if name in gold))  # gold order: the demo's gold follows the text
        assert set(answer.timings) == set(systems.STAGES) and answer.batch_size <= config.systems.batch_size
        assert answer.tokens["generate"] == 0 and answer.tokens["insert"] > 1
        placed += len(answer.images)
    assert placed > 0


def test_m2io_places_images_in_the_generated_text(setup, workdir, monkeypatch):
    config = _config(setup)

    def first_candidate_after_first_sentence(model, examples, **kwargs):
        text = f"{formats.ANSWER_OPEN}<img1>@1{formats.ANSWER_CLOSE}"
        ids = list(setup.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [ids + [kwargs["stop_tokens"][0]] for _ in examples]

    seen = []

    def written(self, questions, passages, images=None):
        seen.append((list(questions), passages, images))
        return [generator.GeneratedText("Open the lid.<img4> Pour the water.", 7) for _ in questions]

    monkeypatch.setattr(evaluation, "greedy_completions", first_candidate_after_first_sentence)
    monkeypatch.setattr(generator.Generator, "answer", written)
    system = systems.build_system("m2io", config, workdir, dataset=setup.dataset, encoder=_encoder(setup))
    questions = setup.dataset.questions_of("test")[:7]
    answers = system.answer(questions)
    assert [len(batch) for batch, _, _ in seen] == [5, 2]  # config.systems.batch_size questions per batch
    assert all(images is None for _, _, images in seen)
    assert any(answer.image_map for answer in answers)
    for answer in answers:
        assert answer.tokens == {"generate": 7, "insert": answer.tokens["insert"]} and answer.tokens["insert"] > 1
        if answer.image_map:  # the inserter saw the generated text with its placeholder removed
            assert answer.text == "Open the lid.<img1> Pour the water."
            assert answer.images == [answer.image_map["img1"]]


def test_rule_threshold_comes_from_eval_json_else_from_validation(setup, workdir, tmp_path):
    config = _config(setup)
    retrieval = systems.build_retrieval(config, workdir, setup.dataset, _encoder(setup))
    trained, _ = setup.examples("validation")
    expected, _ = evaluation.choose_rule_threshold(trained, _encoder(setup), config.inserter)
    empty = str(tmp_path / "no_eval")
    os.makedirs(empty)
    assert systems.rule_threshold(config, empty, setup.dataset, retrieval, _encoder(setup)) == expected
    recorded = str(tmp_path / "with_eval")
    os.makedirs(recorded)
    with open(os.path.join(recorded, "eval.json"), "w") as f:
        json.dump({"rule": {"image_f1": 0.5, "threshold": 0.85}}, f)
    assert systems.rule_threshold(config, recorded, setup.dataset, retrieval, _encoder(setup)) == 0.85


def test_rule_places_by_its_threshold(setup, workdir, tmp_path, monkeypatch):
    config = _config(setup)
    run = tmp_path / "rule_run"
    os.makedirs(run)
    os.symlink(os.path.join(workdir, "generator"), run / "generator")
    questions = setup.dataset.questions_of("test")[:4]

    def rule_answers(threshold):
        with open(run / "eval.json", "w") as f:
            json.dump({"rule": {"threshold": threshold}}, f)
        return systems.build_system("rule", config, str(run), dataset=setup.dataset,
                                    encoder=_encoder(setup)).answer(questions)

    for answer in rule_answers(1.0):  # the tiny generator's own text; no caption is that similar
        assert answer.images == [] and answer.tokens["generate"] > 0 and answer.tokens["insert"] == 0
    monkeypatch.setattr(generator.Generator, "answer", lambda self, questions, passages, images=None: [
        generator.GeneratedText("Open the lid. Pour the water.", 7) for _ in questions])
    everything = rule_answers(-1.0)
    assert any(answer.image_map for answer in everything)
    for answer in everything:
        assert sorted(answer.images) == sorted(answer.image_map.values())
        assert metrics.strip_image_markers(answer.text) == "Open the lid. Pour the water."


def test_no_candidate_image_gives_an_answer_without_placeholders(setup, workdir, tmp_path, monkeypatch):
    documents = {key: dataclasses.replace(doc, content=doc.content.replace("<PIC>", ""), images=())
                 for key, doc in setup.dataset.documents.items()}
    imageless = SplitDataset(DATASET, setup.dataset.questions, setup.dataset.question_split, documents,
                             setup.dataset.images)
    monkeypatch.setattr(generator.Generator, "answer", lambda self, questions, passages, images=None: [
        generator.GeneratedText("It is shown here.<img1> Done.", 5) for _ in questions])
    config = _config(setup)
    question = mramg.Question(id="free", question="How do I descale the kettle?", provenance=(), ground_truth="",
                              images=(), dataset=DATASET)
    run = _run_dir(tmp_path, workdir)  # its own index: this corpus differs from the module's
    for name in ("m2io", "rule", "llm"):
        system = systems.build_system(name, config, run, dataset=imageless, encoder=_encoder(setup))
        (answer,) = system.answer([question])
        assert answer.images == [] and answer.image_map == {} and "<img" not in answer.text
        assert answer.text == "It is shown here. Done." and answer.tokens["insert"] == 0


def test_missing_checkpoints_name_the_command_that_creates_them(setup, tmp_path):
    config = _config(setup)
    with pytest.raises(cli.UserError, match="python -m m2io_jax.train --config=CONFIG"):
        systems.build_system("m2io", config, str(tmp_path), dataset=setup.dataset, encoder=_encoder(setup))
    with pytest.raises(cli.UserError, match=r"sft: no inserter checkpoint"):
        systems.build_system("m2io-sft", config, str(tmp_path), dataset=setup.dataset, encoder=_encoder(setup))
    with pytest.raises(cli.UserError, match="python -m m2io_jax.train_generator"):
        systems.build_system("llm", config, str(tmp_path), dataset=setup.dataset, encoder=_encoder(setup))
    with pytest.raises(cli.UserError, match="expected one of"):
        systems.build_system("m2io-grpo", config, str(tmp_path), dataset=setup.dataset)


def test_index_load_mode_names_the_command_that_builds_the_index(setup, workdir, tmp_path):
    config = _config(setup)
    config.systems.index = "load"
    with pytest.raises(cli.UserError, match="python -m m2io_jax.retrieval.build_index"):
        systems.build_system("oracle-text", config, _run_dir(tmp_path, workdir), dataset=setup.dataset,
                             encoder=_encoder(setup))
    config.systems.index = "rebuild"
    with pytest.raises(cli.UserError, match="systems.index='rebuild'"):
        systems.build_system("oracle-text", config, workdir, dataset=setup.dataset, encoder=_encoder(setup))


def test_llm_writes_the_placeholders_itself(setup, workdir, tmp_path, monkeypatch):
    seen = []

    def written(self, questions, passages, images=None):
        seen.append((passages, images))
        return [generator.GeneratedText("Open the lid.<img2> Pour the water.", 9) for _ in questions]

    monkeypatch.setattr(generator.Generator, "answer", written)
    system = systems.build_system("llm", _config(setup), _run_dir(tmp_path, workdir), dataset=setup.dataset,
                                  encoder=_encoder(setup))
    answers = system.answer(setup.dataset.questions_of("test")[:3])
    (passages, images), = seen
    assert any("img2" in answer.image_map for answer in answers)
    for answer, shown, listed in zip(answers, passages, images):
        assert listed == [(tag, setup.dataset.images[name].caption) for tag, name in answer.image_map.items()]
        assert any("<img" in passage for passage in shown) == bool(answer.image_map)
        assert answer.tokens == {"generate": 9, "insert": 0} and answer.timings["insert"] == 0.0
        if "img2" in answer.image_map:
            assert answer.text == "Open the lid.<img2> Pour the water." and answer.images == [answer.image_map["img2"]]


def test_prediction_keeps_the_image_map(setup):
    answer = systems.SystemAnswer("q1", "A.<img2> B.", ["b"], {"img1": "a", "img2": "b"}, {}, {}, 1)
    prediction = answer.prediction(DATASET)
    assert prediction.images() == ["b"] and prediction.dataset == DATASET and prediction.final_output == answer.text
