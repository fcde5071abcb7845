"""DecoderConfig against the published checkpoints and transformers' own config classes."""

import pytest
import transformers

from models import presets
from models.config import ConfigError, DecoderConfig, RopeScaling

# Parameter counts published with the checkpoints (Hugging Face model cards / safetensors metadata).
PUBLISHED_PARAMS = {
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_2_1b": 1_235_814_400,
    "smollm2_135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_sizes_match_published_parameter_counts(name):
  assert presets.get(name).num_params() == PUBLISHED_PARAMS[name]


def test_gemma2_27b_query_scale_is_not_head_dim():
  config = presets.gemma2_27b()
  assert config.head_dim == 128 and config.query_scale == pytest.approx(144 ** -0.5)


def test_gemma2_layers_alternate_sliding_from_layer_zero():
  assert presets.tiny_gemma2().layer_windows() == [5, None, 5]


@pytest.mark.parametrize("name", ["gemma2_2b", "gemma2_27b", "llama3_1_8b", "llama3_2_1b", "smollm2_135m",
                                  "tiny_llama", "tiny_gemma2"])
def test_hf_round_trip_through_transformers(name):
  """to_hf() -> transformers config class -> to_dict() -> from_hf() gives the same config back."""
  config = presets.get(name)
  hf = config.to_hf()
  cls = transformers.Gemma2Config if config.is_gemma else transformers.LlamaConfig
  reloaded = DecoderConfig.from_hf(cls(**hf).to_dict())
  assert reloaded == config


def test_from_hf_reads_transformers4_rope_scaling_spelling():
  hf = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16).to_dict()
  hf.pop("rope_parameters", None)
  hf["rope_theta"] = 500_000.0
  hf["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
  config = DecoderConfig.from_hf(hf)
  assert config.rope_theta == 500_000.0
  assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "num_heads=4 is not a multiple of num_kv_heads=3"),
])
def test_bad_config_json_gets_one_sentence(change, message):
  hf = presets.tiny_llama().to_hf()
  hf.update(change)
  with pytest.raises(ConfigError, match=message):
    DecoderConfig.from_hf(hf)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown decoder preset 'gemma7'"):
    presets.get("gemma7")
