"""A tiny random BERT (`bert`, `bert_hf`, `sentence_encoder`): Hugging Face and sentence-transformers round
trips, layer-wise parity with transformers, pooling, checkpoint variants, mesh loading, length-bucketed batches."""

import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from flax import nnx
from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers

from m2io_jax import models, sharding
from m2io_jax.models import bert, bert_hf, hf, qwen2, sentence_encoder

_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "retrieval augmented generation with images",
    "a recipe for bread: flour, water, salt and yeast",
    "press the reset button for ten seconds",
]
_CONFIG = bert.BertConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64
)


def _tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=_CONFIG.vocab_size, special_tokens=specials)
    tok.train_from_iterator(_TEXTS * 4, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    encoder = sentence_encoder.SentenceEncoder(
        bert.BertModel(_CONFIG, rngs=nnx.Rngs(0)), _tokenizer(), sentence_encoder.PoolingConfig("mean", True, 16)
    )
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    models.save_pretrained(encoder, path)
    return encoder, path


def test_round_trip_through_registry(saved):
    encoder, path = saved
    loaded = models.from_pretrained(path)
    assert loaded.model.config == _CONFIG
    assert loaded.pooling == encoder.pooling
    np.testing.assert_array_equal(loaded.encode(_TEXTS), encoder.encode(_TEXTS))


def test_load_encoder_reads_a_directory_and_rejects_other_models(saved, tmp_path):
    encoder, path = saved
    np.testing.assert_array_equal(sentence_encoder.load_encoder(path).encode(_TEXTS), encoder.encode(_TEXTS))
    decoder_config = qwen2.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)
    models.save_pretrained(qwen2.Qwen2ForCausalLM(decoder_config, rngs=nnx.Rngs(0)), str(tmp_path))
    with pytest.raises(TypeError, match=r"config.json: model_type 'qwen2' is not a text encoder; expected 'bert'"):
        sentence_encoder.load_encoder(str(tmp_path))


def test_hidden_states_match_transformers_every_layer(saved):
    import torch
    import transformers
    encoder, path = saved
    reference = transformers.BertModel.from_pretrained(path).eval()
    texts = _TEXTS + ["short", "a longer sentence about bread and the reset button and a fox " * 3]
    states, ids = encoder.token_embeddings(texts, max_length=40)
    assert max(len(i) for i in ids) == 40  # truncated at max_length
    for layer in range(_CONFIG.num_layers + 1):
        ours, _ = encoder.token_embeddings(texts, layer=layer, max_length=40)
        for i, token_ids in enumerate(ids):
            with torch.no_grad():
                out = reference(torch.tensor([token_ids]), output_hidden_states=True)
            np.testing.assert_allclose(ours[i], out.hidden_states[layer][0].numpy(), atol=2e-5,
                                       err_msg=f"layer {layer}")
    np.testing.assert_array_equal(states[0], ours[0])  # the default layer is the last one


def test_sentence_transformers_loads_what_we_save(saved):
    import sentence_transformers
    encoder, path = saved
    reference = sentence_transformers.SentenceTransformer(path, device="cpu").encode(_TEXTS)
    np.testing.assert_allclose(encoder.encode(_TEXTS), reference, atol=2e-5)


def test_loading_on_a_mesh_matches_single_device(saved):
    encoder, path = saved
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_rules(sharding.DEFAULT_RULES + (("encoder_heads", "tensor"), ("encoder_mlp", "tensor"))):
        sharded = models.from_pretrained(path, mesh=mesh)
    kernel = sharded.model.layers[0].mlp_in_kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(sharded.encode(_TEXTS), encoder.encode(_TEXTS), atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_pooling_modes(saved, mode):
    saved_encoder, _ = saved
    encoder = sentence_encoder.SentenceEncoder(
        saved_encoder.model, saved_encoder.tokenizer, sentence_encoder.PoolingConfig(mode, False, 16)
    )
    (ids,) = encoder.tokenize(_TEXTS[:1])
    hidden = np.asarray(encoder.model(np.array([ids], np.int32), np.ones((1, len(ids)), np.int32)))[0]  # [T, D]
    pooled = {"mean": hidden.mean(0), "max": hidden.max(0), "cls": hidden[0]}[mode]
    expected = pooled / np.linalg.norm(pooled)  # `encode` always normalises
    np.testing.assert_allclose(encoder.encode(_TEXTS[:1])[0], expected, atol=1e-5)


def test_pooling_config_errors(tmp_path):
    (tmp_path / "modules.json").write_text(
        '[{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}')
    with pytest.raises(ValueError, match="1_Pooling/config.json: expected exactly one"):
        sentence_encoder.PoolingConfig.from_dir(str(tmp_path), 512)
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 8192}')
    expected = sentence_encoder.PoolingConfig("cls", False, 512)
    assert sentence_encoder.PoolingConfig.from_dir(str(tmp_path), 512) == expected


def test_missing_weights_and_bad_config(tmp_path):
    with pytest.raises(ValueError, match="missing BERT keys"):
        bert.BertConfig.from_hf({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        bert_hf.load_model(str(tmp_path), bert.BertConfig.from_hf(_CONFIG.to_hf()))


@pytest.fixture
def rewritten(saved, tmp_path):
    """A copy of the saved tiny encoder whose weights `edit` (a function of the tensor dict) rewrites."""
    _, source = saved
    target = tmp_path / "copy"
    shutil.copytree(source, target)

    def rewrite(edit):
        checkpoint = hf.SafetensorsCheckpoint(str(target))
        tensors = {name: np.array(checkpoint.read(name)) for name in checkpoint._entries}
        del checkpoint
        hf.write_safetensors(str(target / hf.SINGLE_FILE), list(edit(tensors).items()))
        return str(target)

    return rewrite


def test_bert_prefixed_checkpoint_without_pooler_loads(saved, rewritten):
    encoder, _ = saved
    path = rewritten(lambda t: {"bert." + k: v for k, v in t.items() if not k.startswith("pooler.")})
    loaded = models.from_pretrained(path)
    np.testing.assert_array_equal(loaded.encode(_TEXTS), encoder.encode(_TEXTS))
    np.testing.assert_array_equal(loaded.model.pooler.kernel.get_value(), 0.0)
    np.testing.assert_array_equal(loaded.model.pooler.bias.get_value(), 0.0)


def test_bfloat16_checkpoint_loads(saved, rewritten):
    encoder, _ = saved
    path = rewritten(lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    np.testing.assert_allclose(models.from_pretrained(path).encode(_TEXTS), encoder.encode(_TEXTS), atol=2e-2)


def test_pooler_of_wrong_shape_raises(rewritten):
    path = rewritten(lambda t: {**t, "pooler.dense.bias": np.zeros((31,), np.float32)})
    expected = r"model.safetensors: tensor 'pooler.dense.bias' has shape \(31,\); expected \(32,\)"
    with pytest.raises(ValueError, match=expected):
        models.from_pretrained(path)


def test_missing_tensor_under_prefix_raises(rewritten):
    path = rewritten(lambda t: {"roberta." + k: v for k, v in t.items() if k != "encoder.layer.1.output.dense.weight"})
    with pytest.raises(KeyError, match=r"'roberta.encoder.layer.1.output.dense.weight' is missing"):
        models.from_pretrained(path)


def test_length_bucketed_batches():
    token_ids = [list(range(1, n + 1)) for n in (3, 30, 5, 20, 7)]
    batches = sentence_encoder.length_bucketed_batches(token_ids, batch_size=4, max_length=64)
    assert [b.ids.shape for b in batches] == [(4, 32), (1, 8)]
    assert list(batches[0].rows) == [1, 3, 4, 2]
    for batch in batches:
        for i, r in enumerate(batch.rows):
            n = len(token_ids[r])
            assert batch.ids[i, :n].tolist() == token_ids[r] and not batch.ids[i, n:].any()
            assert batch.mask[i].tolist() == [1] * n + [0] * (batch.ids.shape[1] - n)
